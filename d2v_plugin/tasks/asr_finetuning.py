"""fairseq adapter: the ``d2v_asr_finetuning`` task (CTC speech recognition), its CTC
generator for ``fairseq-generate`` (``--decoder viterbi|beam|kenlm``, see ctc_decoding.py)
and the ``d2v_wer`` scorer, whose summary line names the decoder and adds the CER."""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import editdistance
import torch
from fairseq.data import Dictionary
from fairseq.dataclass import FairseqDataclass
from fairseq.scoring import BaseScorer, register_scorer
from fairseq.tasks import FairseqTask, register_task
from omegaconf import MISSING

from ..ctc_decoding import DECODERS, CTCDecoder, DecoderSettings
from ..data.audio import AudioDataError, LabelledAudioDataset
from ..fairseq_utils import unwrap
from ..modules.feature_extractor import conv_output_lengths
from .base import FinetuneTaskMixin, LabelledAudioTaskMixin, NoDictionaryTask, RunFeedbackMixin, data_dir
from .run_config import LabelledAudioConfig

logger = logging.getLogger(__name__)


@dataclass
class D2vAsrFinetuningConfig(LabelledAudioConfig):
    data: str = field(
        default=MISSING, metadata={"help": "directory with {split}.tsv manifests, {split}.{labels} and dict.{labels}.txt"}
    )
    labels: str = field(default="ltr", metadata={"help": "label file extension: {split}.ltr and dict.ltr.txt"})
    # fairseq-generate: how CTC outputs become text (the beam size is fairseq's --beam)
    decoder: str = field(default="viterbi", metadata={
        "help": f"CTC decoding in fairseq-generate: {' | '.join(DECODERS)} (best path; prefix beam search without LM; "
                "lexicon beam search with the KenLM word n-gram --decoder-lm)"})
    decoder_lm: str = field(default="", metadata={"help": "--decoder kenlm: ARPA/binary LM (python -m d2v_plugin.prep.lm)"})
    lexicon: str = field(default="", metadata={"help": "--decoder kenlm: word spellings (default: lexicon.txt beside the LM)"})
    decoder_lm_weight: Optional[float] = field(default=None, metadata={
        "help": "--decoder kenlm: LM weight (default: the sweep's decoding.json beside the LM, else 2)"})
    word_score: Optional[float] = field(default=None, metadata={
        "help": "--decoder kenlm: score added per word (default: the sweep's decoding.json beside the LM, else 0)"})
    beam_threshold: float = field(default=25.0, metadata={"help": "beam decoders: drop hypotheses this far below the best"})
    sil_score: float = field(default=0.0, metadata={"help": "beam decoders: score added per word separator"})


class CTCGenerator:
    """CTC decoding in fairseq's hypothesis format: per utterance one hypothesis with
    tokens, score (the search's) and per-token scores (the emitting frame's log-prob for
    best path; zeros for beam searches, which give none)."""

    description = "viterbi (best path)"  # the decoder of the last generator built, for d2v_wer's summary

    def __init__(self, dictionary: Dictionary, settings: Optional[DecoderSettings] = None):
        self.dictionary = dictionary
        self.blank = dictionary.bos()
        self.symbols_to_strip_from_output = {dictionary.bos(), dictionary.pad(), dictionary.eos()}
        self.decoder = CTCDecoder(settings or DecoderSettings(), dictionary.symbols, self.blank)
        CTCGenerator.description = self.decoder.s.describe()
        logger.info("CTC decoder: %s", CTCGenerator.description)

    @torch.no_grad()
    def generate(self, models, sample, **unused) -> List[List[Dict]]:
        if len(models) != 1:
            raise ValueError("CTC decoding takes one model (--path with a single checkpoint)")
        model = models[0]
        net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        hyps = self.decoder.decode(lprobs, model.output_lengths(net_output))
        return [[{"tokens": t, "score": s, "positional_scores": p, "alignment": None}] for t, p, s in hyps]


@register_task("d2v_asr_finetuning", dataclass=D2vAsrFinetuningConfig)
class D2vAsrFinetuningTask(RunFeedbackMixin, LabelledAudioTaskMixin, FinetuneTaskMixin, NoDictionaryTask, FairseqTask):
    cfg: D2vAsrFinetuningConfig

    def __init__(self, cfg: D2vAsrFinetuningConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.checked_optimizer = False

    @classmethod
    def setup_task(cls, cfg: D2vAsrFinetuningConfig, **kwargs):
        path = os.path.join(data_dir(cfg, "d2v_plugin.prep.audio_manifest + prep.asr_labels"), f"dict.{cfg.labels}.txt")
        if not os.path.isfile(path):
            raise AudioDataError(f"{path} not found; write the labels and dictionary with "
                                 "`python -m d2v_plugin.prep.asr_labels TRANSCRIPTS --manifest-dir DATA`")
        return cls(cfg, Dictionary.load(path))

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, task_cfg=None, **kwargs):
        data = self.cfg.data
        self.datasets[split] = LabelledAudioDataset(
            os.path.join(data, f"{split}.tsv"), os.path.join(data, f"{split}.{self.cfg.labels}"), self.dictionary,
            self.cfg.sample_rate, self.cfg.max_sample_size, self.cfg.min_sample_size, self.cfg.normalize, self.cfg.seed,
            shuffle=split == "train",
        )
        self.check_lengths(split)
        return self.datasets[split]

    def check_lengths(self, split: str) -> None:
        """Also count utterances with fewer frames than target units: CTC cannot align those
        (``zero_infinity`` zeroes their loss)."""
        ds = super().check_lengths(split)
        if ds is None:
            return
        frames = conv_output_lengths(torch.from_numpy(ds.sizes), self.encoder.spec)
        short = sum(int(f) < len(lab) for f, lab in zip(frames, ds.labels))
        if short:
            logger.warning("%s: %d of %d utterances have fewer frames than label units; CTC ignores them",
                           split, short, len(ds))

    def optimizer_step(self, optimizer, model, update_num):
        if not self.checked_optimizer:
            inner = optimizer
            for attr in ("fp32_optimizer", "wrapped_optimizer"):
                inner = getattr(inner, attr, inner)
            if unwrap(model).cfg.layer_decay < 1.0 and type(inner).__name__ != "FairseqCompositeOptimizer":
                raise ValueError("model.layer_decay < 1 needs optimizer._name=composite with dynamic_groups=true "
                                 "(see the README, per-layer learning rates); or set model.layer_decay=1")
            self.checked_optimizer = True
        super().optimizer_step(optimizer, model, update_num)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **unused):
        c = self.cfg
        if getattr(args, "lm_path", None):
            raise ValueError("--lm-path loads fairseq neural LMs for seq2seq fusion; for CTC use --decoder kenlm "
                             "--decoder-lm DIR/lm.arpa (python -m d2v_plugin.prep.lm)")
        beam = int(getattr(args, "beam", 5))
        settings = DecoderSettings(c.decoder, beam, c.beam_threshold, c.decoder_lm, c.lexicon, c.decoder_lm_weight,
                                   c.word_score, c.sil_score)
        generator = CTCGenerator(self.target_dictionary, settings)
        if c.decoder == "viterbi" and hasattr(args, "beam"):
            args.beam = 1  # fairseq-generate's summary says "beam=N": best path is beam 1
        return generator

    @property
    def target_dictionary(self):
        return self.dictionary


@dataclass
class D2vWerConfig(FairseqDataclass):
    pass


@register_scorer("d2v_wer", dataclass=D2vWerConfig)
class D2vWerScorer(BaseScorer):
    """WER and CER (words split on spaces; characters including spaces) of
    ``--post-process letter`` strings, and the CTC decoder that produced them."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.words = self.word_errors = self.chars = self.char_errors = 0

    def add_string(self, ref: str, pred: str) -> None:
        self.word_errors += editdistance.eval(ref.split(), pred.split())
        self.words += len(ref.split())
        self.char_errors += editdistance.eval(ref, pred)
        self.chars += len(ref)

    def score(self) -> float:
        return 100.0 * self.word_errors / max(1, self.words)

    def result_string(self) -> str:
        cer = 100.0 * self.char_errors / max(1, self.chars)
        return f"WER: {self.score():.2f}, CER: {cer:.2f}, decoder: {CTCGenerator.description}"
