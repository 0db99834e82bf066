"""CTC decoders for letter labels: best path, beam search, beam search with a word n-gram LM.

    viterbi  the most probable frame labels, repeats merged, blanks removed (no search)
    beam     CTC prefix beam search over letters (alignments of a prefix summed), no LM
    kenlm    lexicon-constrained beam search with a KenLM word n-gram LM, fairseq's and
             wav2letter's recipe: score = acoustic + lm_weight * LM + word_score * words

The searches run in flashlight-text (the decoder fairseq's own speech recognition
recipes and torchaudio use; optional extra ``.[lm]``). The LM and lexicon come from
``python -m d2v_plugin.prep.lm``. Inputs are log-probabilities (B, T, V) of the label
dictionary, whose ``blank`` index is the CTC blank and whose ``|`` is the word separator.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .data.letters import WORD_SEP
from .modules.ctc import ctc_best_path, emitting_frames

DECODERS = ("viterbi", "beam", "kenlm")
Hypothesis = Tuple[Tensor, Tensor, float]  # tokens (S,), per-token scores (S,), path score


class DecoderError(ValueError):
    """A decoder setting, LM or lexicon that cannot decode these labels."""


@dataclass
class DecoderSettings:
    kind: str = "viterbi"
    beam: int = 50
    beam_threshold: float = 25.0
    lm: str = ""
    lexicon: str = ""
    lm_weight: Optional[float] = None
    word_score: Optional[float] = None
    sil_score: float = 0.0
    unk_score: float = -math.inf

    def resolved(self) -> "DecoderSettings":
        """Fill the LM weight and word score from the sweep's DIR/decoding.json (``prep.lm``'s
        folder, written by ``examples/lm_sweep.py``) where they were not given; lexicon
        defaults to DIR/lexicon.txt."""
        if self.kind not in DECODERS:
            raise DecoderError(f"--decoder {self.kind}: choose one of {', '.join(DECODERS)}")
        if self.kind != "kenlm":
            return self
        if not self.lm:
            raise DecoderError("--decoder kenlm needs --decoder-lm DIR/lm.arpa (python -m d2v_plugin.prep.lm)")
        if not os.path.isfile(self.lm):
            raise DecoderError(f"--decoder-lm {self.lm}: file not found; build it with `python -m d2v_plugin.prep.lm TEXT "
                               "--out DIR --dict DATA/dict.ltr.txt`")
        folder = os.path.dirname(os.path.abspath(self.lm))
        swept = os.path.join(folder, "decoding.json")
        tuned = json.load(open(swept)) if os.path.isfile(swept) else {}
        lexicon = self.lexicon or os.path.join(folder, "lexicon.txt")
        if not os.path.isfile(lexicon):
            raise DecoderError(f"--lexicon {lexicon}: file not found (prep.lm writes DIR/lexicon.txt)")
        pick = lambda given, key, default: given if given is not None else tuned.get(key, default)  # noqa: E731
        return DecoderSettings(self.kind, self.beam, self.beam_threshold, self.lm, lexicon,
                               pick(self.lm_weight, "lm_weight", 2.0), pick(self.word_score, "word_score", 0.0),
                               self.sil_score, self.unk_score)

    def describe(self) -> str:
        if self.kind == "viterbi":
            return "viterbi (best path)"
        if self.kind == "beam":
            return f"beam (prefix search, beam {self.beam}, no LM)"
        return (f"kenlm (beam {self.beam}, LM {os.path.basename(self.lm)}, lm_weight {self.lm_weight:g}, "
                f"word_score {self.word_score:g}, lexicon {os.path.basename(self.lexicon)})")


def _flashlight():
    try:
        from flashlight.lib.text import decoder, dictionary
        from flashlight.lib.text.decoder.kenlm import KenLM
    except ImportError as e:
        raise DecoderError(f"beam-search decoding needs flashlight-text: pip install 'd2v_plugin[lm]' ({e})") from None
    decoder.KenLM = KenLM  # its new home; the old path warns
    return decoder, dictionary


class CTCDecoder:
    """symbols: the label dictionary's symbols in index order; blank: the CTC blank index."""

    def __init__(self, settings: DecoderSettings, symbols: Sequence[str], blank: int):
        self.s, self.symbols, self.blank = settings.resolved(), list(symbols), blank
        if self.s.kind == "viterbi":
            return
        if WORD_SEP not in self.symbols:
            raise DecoderError(f"beam decoding needs letter labels with the word separator {WORD_SEP!r} (prep.asr_labels)")
        self.sil = self.symbols.index(WORD_SEP)
        self.index = {sym: i for i, sym in enumerate(self.symbols)}
        fl, fd = _flashlight()
        kind = fl.CriterionType.CTC
        if self.s.kind == "beam":
            opts = fl.LexiconFreeDecoderOptions(self.s.beam, len(self.symbols), self.s.beam_threshold, 0.0,
                                                self.s.sil_score, True, kind)
            self.decoder = fl.LexiconFreeDecoder(opts, fl.ZeroLM(), self.sil, blank, [])
        else:
            self.decoder = self._lexicon_decoder(fl, fd, kind)

    def _lexicon_decoder(self, fl, fd, kind):
        lexicon = fd.load_words(self.s.lexicon)  # {word: [spelling, ...]}
        index = self.index
        unknown = sorted({u for spellings in lexicon.values() for sp in spellings for u in sp if u not in index})
        if unknown:
            raise DecoderError(f"{self.s.lexicon}: units {' '.join(unknown)} are not labels of this model's dictionary; "
                               "rebuild it with `python -m d2v_plugin.prep.lm ... --dict DATA/dict.ltr.txt`")
        self.words = fd.create_word_dict(lexicon)
        try:
            self.lm = fl.KenLM(self.s.lm, self.words)
        except Exception as e:  # KenLM raises its own C++ exception types
            raise DecoderError(f"{self.s.lm}: not a KenLM ARPA or binary LM ({str(e).splitlines()[0][:200]})") from None
        trie, start = fl.Trie(len(self.symbols), self.sil), self.lm.start(False)
        for word, spellings in lexicon.items():
            w = self.words.get_index(word)
            _, score = self.lm.score(start, w)
            for sp in spellings:
                trie.insert([index[u] for u in sp], w, score)
        trie.smear(fl.SmearingMode.MAX)
        opts = fl.LexiconDecoderOptions(self.s.beam, len(self.symbols), self.s.beam_threshold, self.s.lm_weight,
                                        self.s.word_score, self.s.unk_score, self.s.sil_score, False, kind)
        return fl.LexiconDecoder(opts, trie, self.lm, self.sil, self.blank, self.words.get_index("<unk>"), [], False)

    def decode(self, lprobs: Tensor, lengths: Tensor) -> List[Hypothesis]:
        """lprobs: (B, T, V) log-probabilities, lengths: (B,) valid frames -> per sample
        (label tokens (S,), per-token scores (S,): zeros where the search gives none, score)."""
        if self.s.kind == "viterbi":
            return ctc_best_path(lprobs, lengths, self.blank)
        emissions = lprobs.detach().float().cpu().contiguous()  # (B, T, V) as flashlight reads it
        B, T, V = emissions.shape
        out = []
        for b, n in enumerate(lengths.tolist()):
            best = self.decoder.decode(emissions.data_ptr() + b * emissions.stride(0) * 4, int(n), V)[0]
            tokens = self._spell(best.words) if self.s.kind == "kenlm" else self._collapse(best.tokens[1:-1])
            out.append((tokens, torch.zeros(len(tokens)), float(best.score)))
        return out

    def _collapse(self, frames: Sequence[int]) -> Tensor:
        """Frame labels -> tokens: repeats merged, blanks and -1 removed (the search's (T + 2)
        labels start and end with its own separator states, dropped by the caller)."""
        path = torch.tensor(list(frames), dtype=torch.long)
        return path[emitting_frames(path, self.blank) & (path >= 0)]

    def _spell(self, words: Sequence[int]) -> Tensor:
        """Word ids -> their letters, each word followed by the separator (the .ltr layout)."""
        tokens = [self.index[u] for w in words if w >= 0 for u in [*self.words.get_entry(w), WORD_SEP]]
        return torch.tensor(tokens, dtype=torch.long)
