"""Predictions of a fine-tuned model, with or without fairseq.

    python -m d2v_plugin.predict --checkpoint CKPT_OR_EXPORT --input PATHS_OR_LIST [...] --out OUT.tsv \\
        [--decoder viterbi|beam|kenlm --decoder-lm DIR/lm.arpa]

CKPT: a fine-tuned checkpoint (``d2v_ctc``, ``d2v_audio_classifier``, ``d2v_text_classifier``,
``d2v_image_classifier``; checkpoint_best.pt) or its ``python -m d2v_plugin.export --to
safetensors`` folder. ``--input`` as for ``d2v_plugin.extract`` (files, a .tsv manifest or
image list, or for text files of lines). OUT.tsv: one line per input, ``input<TAB>prediction
<TAB>score``: the transcript and the CTC path score (log-probability) for speech recognition,
the class and its probability for classifiers, the value for text regression.

In Python::

    import d2v_plugin
    p = d2v_plugin.load("checkpoint_best.pt")   # a Predictor: also extracts features (its Extractor part)
    p.predict(["a.wav", "b.wav"])               # [Prediction(input, label, score, probs), ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from .extract import ExtractError, Extractor, _progress, build_model, read_inputs
from .modules.heads import HEADS, fine_tuned

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Prediction:
    input: str
    label: Optional[str]  # the transcript (CTC), the class, or None (regression)
    score: float  # CTC: the path's log-probability; classes: the label's probability; regression: the value
    probs: Optional[np.ndarray] = None  # classes: the probability of each of ``Predictor.outputs``


class Predictor(Extractor):
    """A fine-tuned model (``net``: the encoder + its head) in eval mode; ``outputs`` names its
    outputs (CTC: the label dictionary's symbols; classifiers: the classes; [] for regression).
    As an ``Extractor`` it extracts features of the fine-tuned encoder."""

    def __init__(self, net: torch.nn.Module, kind: str, outputs: Sequence[str], task: Dict,
                 task_state: Optional[Dict] = None, path: str = ""):
        super().__init__(net.encoder, HEADS[kind].MODALITY, task, task_state, path)
        self.net, self.kind, self.outputs = net.eval(), kind, list(outputs)

    def to(self, dtype: torch.dtype) -> "Predictor":
        self.net.to(dtype)
        self.dtype = dtype
        return self

    @torch.no_grad()
    def logits(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """A batch -> the head's float32 output: logits (B, T, V) and padding (CTC) or logits (B, C)."""
        out = self.net(self._cast(source), padding_mask)
        return {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in out.items()}

    def predict(self, inputs: Iterable, batch_size: int = 8, progress: bool = False, decoder=None,
                sort: bool = True) -> List[Prediction]:
        """inputs: paths (audio, image) or sentences (text) -> one ``Prediction`` each, in input
        order. ``decoder``: a ``ctc_decoding.DecoderSettings`` for speech recognition (default:
        best path). ``sort``: batch by length (``Extractor.batches``)."""
        inputs = [str(x) for x in inputs]
        ctc = self._ctc_decoder(decoder) if self.kind == "d2v_ctc" else None
        results: List[Prediction] = [None] * len(inputs)
        bar = _progress(len(inputs), progress)
        for positions, sources in self.batches(inputs, batch_size, sort):
            items = [inputs[i] for i in positions]
            out = self.logits(*self.batch(sources))
            for b, item in enumerate(items):
                if not torch.isfinite(out["logits"][b]).all():
                    raise ExtractError(f"{item}: the model's output has NaN or infinite values ({self.path}); "
                                       "check the input and the checkpoint (a diverged run gives NaN weights)")
            for i, r in zip(positions, self._ctc(items, out, ctc) if ctc else self._classes(items, out["logits"])):
                results[i] = r
            bar.update(len(items))
        bar.close()
        return results

    def _classes(self, items: Sequence[str], logits: torch.Tensor) -> List[Prediction]:
        if not self.outputs:  # regression: one output
            return [Prediction(item, None, float(v)) for item, v in zip(items, logits[:, 0])]
        probs = torch.softmax(logits, -1)
        best = probs.argmax(-1)
        return [Prediction(item, self.outputs[int(k)], float(p[k]), p.numpy()) for item, p, k in zip(items, probs, best)]

    def _ctc_decoder(self, settings):
        from .ctc_decoding import CTCDecoder, DecoderError, DecoderSettings

        try:
            return CTCDecoder(settings or DecoderSettings(), self.outputs, blank=0)  # blank: <s>, as the criterion's
        except DecoderError as e:
            raise ExtractError(str(e)) from None

    def _ctc(self, items: Sequence[str], out: Dict[str, torch.Tensor], decoder) -> List[Prediction]:
        from .data.letters import letters_to_words

        logits, pad = out["logits"], out["padding_mask"]
        lengths = (~pad).long().sum(-1) if pad is not None else torch.full((len(items),), logits.shape[1])
        specials = set(self.outputs[:4])  # <s> <pad> </s> <unk>: never part of a transcript
        results = []
        for item, (tokens, _, score) in zip(items, decoder.decode(torch.log_softmax(logits, -1), lengths)):
            letters = " ".join(self.outputs[t] for t in tokens.tolist() if self.outputs[t] not in specials)
            results.append(Prediction(item, letters_to_words(letters), float(score)))
        return results


def _text_state(files: Dict[str, bytes]) -> Dict[str, torch.Tensor]:
    """dict.txt / spm.model bytes -> the task-state layout the text reader takes."""
    return {key: torch.frombuffer(bytearray(files[name]), dtype=torch.uint8)
            for name, key in (("dict.txt", "dictionary"), ("spm.model", "spm_model"))}


def finetuned_net(kind: str, pretrained: Dict, encoder_state: Dict, head_state: Dict, head_cfg: Dict,
                  path: str) -> torch.nn.Module:
    """A fine-tuned model's parts -> ``FineTuned`` (encoder + head) with its weights, eval mode."""
    encoder = build_model(pretrained, encoder_state, "student", path, stripped=True, modality=HEADS[kind].MODALITY)
    net = fine_tuned(kind, encoder, head_cfg)
    try:
        net.load_state_dict({**{"encoder." + k: v for k, v in encoder.state_dict().items()}, **head_state})
    except RuntimeError as e:
        raise ExtractError(f"{path}: the {kind} head does not match its weights ({str(e).splitlines()[0][:200]})") from None
    return net.eval()


def load_finetuned(path: str, ft: Dict) -> Predictor:
    """The parts of a fine-tuned checkpoint (``checkpoints.finetuned_parts``) -> ``Predictor``."""
    from .checkpoints import CheckpointError, finetuned_outputs, finetuned_text_files

    kind = ft["name"]
    try:
        if not ft["encoder"]:
            raise KeyError("encoder.*")
        head_cfg = HEADS[kind].config_from(ft["head"], ft["model"])
    except KeyError as e:
        raise ExtractError(f"{path}: a fine-tuned {kind} checkpoint without its weights ({e.args[0]} missing from its "
                           "'model' entry): the file is incomplete; use the checkpoint fairseq-train wrote") from None
    try:
        outputs = finetuned_outputs(ft, path)
        files = finetuned_text_files(ft, path) if HEADS[kind].MODALITY == "text" else None
    except CheckpointError as e:
        raise ExtractError(str(e)) from None
    _check_outputs(path, kind, head_cfg, outputs)
    net = finetuned_net(kind, ft["pretrained"], ft["encoder"], ft["head"], head_cfg, path)
    return Predictor(net, kind, outputs, ft["pretrained_task"], _text_state(files) if files else None, path)


def finetuned_predictor(path: str, pre: Dict) -> Predictor:
    """``export.read_export`` of a fine-tuned model's folder -> ``Predictor``."""
    head = pre["head"]
    encoder = {k[len("encoder."):]: v for k, v in pre["state"].items() if k.startswith("encoder.")}
    head_state = {k: v for k, v in pre["state"].items() if not k.startswith("encoder.")}
    _check_outputs(path, head["kind"], head["config"], head["outputs"])
    net = finetuned_net(head["kind"], pre["model"], encoder, head_state, head["config"], path)
    return Predictor(net, head["kind"], head["outputs"], pre["task"], None, path)


def _check_outputs(path: str, kind: str, head_cfg: Dict, outputs: Sequence[str]) -> None:
    n = head_cfg.get("num_outputs", head_cfg.get("num_classes"))
    expected = max(1, len(outputs)) if kind == "d2v_text_classifier" else len(outputs)
    if n != expected:
        what = "label dictionary" if kind == "d2v_ctc" else "labels.txt"
        raise ExtractError(f"{path}: the {what} of its fine-tuning data names {len(outputs)} outputs, the head has {n}: "
                           "the data folder changed since fine-tuning; restore it")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a fine-tuned checkpoint (checkpoint_best.pt) or its export folder")
    ap.add_argument("--input", required=True, nargs="+", help="files, a .tsv manifest/list, or (text) files of lines")
    ap.add_argument("--out", required=True, help="OUT.tsv: input, prediction, score per line")
    ap.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    ap.add_argument("--decoder", default="viterbi", choices=["viterbi", "beam", "kenlm"],
                    help="speech recognition: best path, beam search, or beam search with a word n-gram LM")
    ap.add_argument("--decoder-lm", default="", help="--decoder kenlm: DIR/lm.arpa of prep.lm (its lexicon and sweep beside it)")
    ap.add_argument("--beam", type=int, default=50, help="beam size of --decoder beam|kenlm")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from .ctc_decoding import DecoderSettings
    from .extract import load

    try:
        p = load(a.checkpoint)
        if not hasattr(p, "predict"):  # (under `python -m` this module is __main__: no isinstance)
            raise ExtractError(f"{a.checkpoint} is a pretraining checkpoint: it has no head to predict with; extract "
                               "features with `python -m d2v_plugin.extract`, or fine-tune it first")
        inputs = read_inputs(a.input, p.modality)
        preds = p.predict(inputs, a.batch_size, progress=True, decoder=DecoderSettings(a.decoder, a.beam, lm=a.decoder_lm))
    except ExtractError as e:
        raise SystemExit(f"error: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        for r in preds:
            f.write(f"{r.input}\t{r.label if r.label is not None else ''}\t{r.score:.6g}\n")
    scores = [r.score for r in preds if math.isfinite(r.score)]
    print(f"wrote {len(preds)} predictions ({p.kind}) to {a.out}" + (f"; mean score {np.mean(scores):.4g}" if scores else ""))


if __name__ == "__main__":
    main()
