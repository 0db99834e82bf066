"""Features from a d2v_plugin pretraining checkpoint, for audio files, image files and text lines.

    python -m d2v_plugin.extract --checkpoint CKPT --input PATHS_OR_LIST [...] \\
        --layer {last,N,avg_top_k,all} --pool {none,mean} --out OUT(.npz | folder)

``--input``: audio/image files, a manifest / image list (``.tsv``: root line, then
relative paths) or, for text, a file of lines (one sentence each). ``--layer``: ``last``
(the encoder output), ``N`` (the output of block N, 1-based), ``avg_top_k`` (the data2vec
target representation: the top-K FFN outputs, each normalised as in pretraining,
averaged) or ``all`` (every block output, shape (L, T, D)). ``--pool mean`` averages over
the real (unpadded) positions. OUT ending in ``.npz`` gets one archive (arrays ``0``,
``1``, ... and ``ids``), otherwise a folder of ``NNNNNN.npy`` plus ``ids.txt``.

In Python::

    import d2v_plugin
    ex = d2v_plugin.load("checkpoint_last.pt")
    feats = ex.extract(["a.wav", "b.wav"], layer="last", pool="mean")  # list of numpy arrays
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .modules.audio import prepare_waveform
from .modules.image import prepare_image
from .modules.text import prepare_tokens

logger = logging.getLogger(__name__)
LAYERS = "last, N (1..depth), avg_top_k, all"


class ExtractError(ValueError):
    """An input or option that the checkpoint cannot extract features for."""


class Extractor:
    """A pretrained ``Data2Vec`` in eval mode and what its modality needs to read inputs."""

    def __init__(self, model, modality: str, task: dict, task_state: Optional[dict] = None, path: str = ""):
        self.model, self.modality, self.task, self.path = model.eval(), modality, task, path
        self.dtype = torch.float32
        self.encoder = model.modality_encoders[modality]
        self.dictionary = self.spm = self.no_vocabulary = None
        if modality == "text":  # without one, the model still takes token ids (extract_features)
            try:
                self.dictionary, self.spm = _text_vocabulary(task, task_state or {}, path)
            except ExtractError as e:
                self.no_vocabulary = e

    def to(self, dtype: torch.dtype) -> "Extractor":
        """Run the model in ``dtype`` (e.g. ``torch.bfloat16``); features come back as float32."""
        self.model.to(dtype)
        self.dtype = dtype
        return self

    def _cast(self, source: torch.Tensor) -> torch.Tensor:
        return source.to(self.dtype) if source.is_floating_point() else source

    # -- inputs -> (source, padding_mask) -------------------------------------------------
    def read(self, item) -> torch.Tensor:
        """One input (a path, or a sentence for text) -> the model's unbatched source."""
        try:
            if self.modality == "audio":
                from .checkpoints import audio_normalize
                from .data.audio import load_audio
                from .modules.feature_extractor import receptive_field

                wav = torch.from_numpy(load_audio(str(item), int(self.task.get("sample_rate", 16000)), "input"))
                field_ = receptive_field(self.encoder.spec)
                if len(wav) < field_:
                    raise ValueError(f"{len(wav)} samples, shorter than the feature extractor's receptive field "
                                     f"({field_} samples): no frame to extract; pad or drop it")
                return prepare_waveform(wav, audio_normalize(self.task))
            if self.modality == "image":
                from .data.image import center_crop, load_image

                return prepare_image(center_crop(load_image(str(item), "input"), self.encoder.input_size))
        except ValueError as e:
            raise ExtractError(f"{item}: cannot be read as {self.modality} input for {self.path or 'this checkpoint'} "
                               f"({self.modality} model): {e}") from e
        if self.no_vocabulary is not None:
            raise self.no_vocabulary
        pieces = " ".join(self.spm.encode(str(item), out_type=str))
        ids = self.dictionary.encode_line(pieces, append_eos=True, add_if_not_exist=False).long()
        limit = self.encoder.max_positions
        if len(ids) + 1 > limit:
            logger.warning("a sentence of %d tokens is cut to text_max_positions=%d", len(ids) + 1, limit)
        return prepare_tokens(ids, self.dictionary.bos(), limit)

    def batch(self, sources: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.modality == "image":
            return torch.stack(list(sources)), None
        pad_value = self.encoder.pad if self.modality == "text" else 0.0
        longest = max(len(s) for s in sources)
        src = torch.stack([F.pad(s, (0, longest - len(s)), value=pad_value) for s in sources])
        pad = torch.arange(longest)[None, :] >= torch.tensor([len(s) for s in sources])[:, None]
        return src, (pad if pad.any() else None)

    # -- features ---------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor],
                 layer="last") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A batch -> (B, T, D) or, for ``all``, (B, L, T, D) features and the (B, T) padding."""
        m, E = self.model, self.encoder.num_extra
        if layer == "all":  # every block's output: the hidden states without the blocks' input
            states, pad = self.hidden(source, padding_mask)
            return states[:, 1:, E:], pad
        stop = None if layer in ("last", "avg_top_k") else self.block_index(layer)
        out = m.extract_features(self._cast(source), padding_mask, modality=self.modality, layer=stop)
        pad = out["padding_mask"]
        if layer == "avg_top_k":
            return m.make_targets([y[:, E:] for y in out["layer_results"][-m.settings.average_top_k_layers:]], pad), pad
        return out["x"], pad

    @torch.no_grad()
    def hidden(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        """A batch -> (B, L + 1, E + T, D): the shared blocks' input, then every block's output,
        extra tokens (image CLS) first; and the (B, T) padding."""
        states, pad = self.model.hidden_states(self._cast(source), padding_mask, self.modality)
        return torch.stack(states, dim=1), pad

    @property
    def downsampling(self) -> int:
        """Input units per output position: audio samples per frame (320 = 20 ms at 16 kHz),
        image pixels per patch side, 1 token per token for text."""
        if self.modality == "audio":
            return int(np.prod([layer.stride for layer in self.encoder.spec]))
        if self.modality == "image":
            return int(self.encoder.patch_embed.patch)
        return 1

    @property
    def frame_rate(self) -> Optional[float]:
        """Audio frames per second (sample rate / downsampling); None for images and text."""
        if self.modality != "audio":
            return None
        return int(self.task.get("sample_rate", 16000)) / self.downsampling

    def block_index(self, layer) -> int:
        """--layer N (1-based block) -> 0-based index, or an error listing the choices."""
        depth = len(self.model.blocks)
        n = int(layer) if str(layer).isdigit() else -1
        if not 1 <= n <= depth:
            raise ExtractError(f"--layer {layer!r}: choose {LAYERS.replace('depth', str(depth))}")
        return n - 1

    def batches(self, inputs: Sequence, batch_size: int, sort: bool = True, window: int = 32):
        """-> (positions in ``inputs``, sources) per batch. ``sort``: inputs are read ``window``
        batches at a time and batched by length, longest first, so that batches hold little
        padding (speech and text of mixed lengths); callers put results back by position. The
        features do not depend on the batch (padded positions are masked), only the time does."""
        step = batch_size * (window if sort else 1)
        for start in range(0, len(inputs), step):
            chunk = [self.read(x) for x in inputs[start : start + step]]
            order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i])) if sort else list(range(len(chunk)))
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                yield [start + i for i in idx], [chunk[i] for i in idx]

    def extract(self, inputs: Iterable, layer="last", pool: str = "none", batch_size: int = 8,
                progress: bool = False, hidden_states: bool = False, sort: bool = True) -> List:
        """inputs: paths (audio, image) or sentences (text) -> one float32 array per input, in
        input order: (T, D) / (L, T, D) with ``pool="none"`` (padding removed), (D,) / (L, D) with
        ``"mean"``. ``hidden_states=True``: one ``HiddenStates`` per input instead (every layer,
        lengths, pooled vectors; ``layer`` and ``pool`` are not used). ``sort``: see ``batches``."""
        if pool not in ("none", "mean"):
            raise ExtractError(f"pool={pool!r}: choose none or mean")
        if layer not in ("last", "avg_top_k", "all"):
            self.block_index(layer)
        inputs = list(inputs)
        results: List = [None] * len(inputs)
        bar = _progress(len(inputs), progress)
        for positions, sources in self.batches(inputs, batch_size, sort):
            items = [inputs[i] for i in positions]
            if hidden_states:
                outs = self._hidden_states(items, *self.batch(sources))
            else:
                outs = self._features(items, *self.features(*self.batch(sources), layer=layer), pool)
            for i, out in zip(positions, outs):
                results[i] = out
            bar.update(len(sources))
        bar.close()
        return results

    def _features(self, items: Sequence, feats: torch.Tensor, pad: Optional[torch.Tensor], pool: str) -> List[np.ndarray]:
        time_axis = feats.dim() - 2  # (B, T, D) -> 1; (B, L, T, D) -> 2
        outs = []
        for b, item in enumerate(items):
            x = feats[b]
            if pad is not None:
                x = x.narrow(time_axis - 1, 0, int((~pad[b]).sum()))
            out = (x.mean(time_axis - 1) if pool == "mean" else x).float().numpy()
            if out.size == 0 or not np.isfinite(out).all():
                what = "no frames" if out.size == 0 else "NaN or infinite values"
                raise ExtractError(f"{item}: the features have {what} ({self.path}); "
                                   "check the input and the checkpoint (a diverged run gives NaN weights)")
            outs.append(out)
        return outs

    def _hidden_states(self, items: Sequence, source: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> List["HiddenStates"]:
        states, pad = self.hidden(source, padding_mask)
        E = self.encoder.num_extra
        out = []
        for b, item in enumerate(items):
            T = states.shape[2] - E if pad is None else int((~pad[b]).sum())
            x = states[b, :, E : E + T].float()  # (L + 1, T, D)
            if T == 0 or not torch.isfinite(states[b]).all():
                raise ExtractError(f"{item}: the hidden states have {'no frames' if T == 0 else 'NaN or infinite values'} "
                                   f"({self.path}); check the input and the checkpoint")
            cls = states[b, :, E - 1].float().numpy() if E else None
            out.append(HiddenStates(x.numpy(), T, x.mean(1).numpy(), cls))
        return out


@dataclasses.dataclass
class HiddenStates:
    """Every layer of one input, as transformers' ``output_hidden_states`` / s3prl's
    ``hidden_states``: index 0 is the shared blocks' input (after positions and the context
    stage), index i the output of block i."""

    hidden_states: np.ndarray  # (L + 1, T, D), padding removed
    length: int  # T, the valid frames / patches / tokens
    mean: np.ndarray  # (L + 1, D): mean over the T positions
    cls: Optional[np.ndarray] = None  # (L + 1, D): the last extra token (image CLS), where the model has one


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="input")
    except ImportError:  # pragma: no cover
        class Silent:
            update = close = staticmethod(lambda *a: None)

        return Silent()


def _text_vocabulary(task: dict, task_state: dict, path: str):
    """The dictionary and sentencepiece model a text checkpoint was trained with: from the
    checkpoint itself (saved by d2v_text_pretraining), else from task.data."""
    import sentencepiece as spm

    from .vocab import Vocabulary as Dictionary

    saved_dict, saved_spm = task_state.get("dictionary"), task_state.get("spm_model")
    data = task.get("data") or ""
    if saved_dict is not None:
        dictionary = Dictionary.load(io.StringIO(bytes(saved_dict.numpy().tobytes()).decode("utf-8")))
    elif os.path.isfile(os.path.join(data, "dict.txt")):
        dictionary = Dictionary.load(os.path.join(data, "dict.txt"))
    else:
        raise ExtractError(f"{path}: the checkpoint holds no dictionary and task.data={data!r} has no dict.txt")
    dictionary.add_symbol("<mask>")
    model = bytes(saved_spm.numpy().tobytes()) if saved_spm is not None else None
    if model is None and os.path.isfile(os.path.join(data, "spm.model")):
        model = open(os.path.join(data, "spm.model"), "rb").read()
    if model is None:
        raise ExtractError(f"{path}: the checkpoint holds no sentencepiece model and task.data={data!r} has no spm.model")
    return dictionary, spm.SentencePieceProcessor(model_proto=model)


WEIGHTS = ("student", "teacher")


def build_model(model_cfg: dict, state: dict, weights: str = "student", path: str = "",
                stripped: bool = False, modality: Optional[str] = None) -> "torch.nn.Module":
    """A ``d2v_multi`` config dict and state dict -> the ``Data2Vec`` encoder in eval mode, the
    pretraining-only parts (teacher, decoders, regression head) removed. ``weights="teacher"``:
    the EMA teacher's tensors (named like the student's) replace the student's where the
    teacher has its own (blocks, context stage, and what else it does not share). ``stripped``:
    ``state`` is already without those parts (an export, or a fine-tuned encoder: then ``modality``
    names the one encoder it kept)."""
    from .models.config import D2vMultiConfig
    from .models.settings import model_settings
    from .modules.data2vec import EMA_KEY, MASTERS_KEY, Data2Vec

    if weights not in WEIGHTS:
        raise ExtractError(f"weights={weights!r}: choose student or teacher")
    fields = set(D2vMultiConfig.__dataclass_fields__)
    model = Data2Vec(model_settings(D2vMultiConfig(**{k: v for k, v in model_cfg.items() if k in fields})))
    model.teacher = None
    state = dict(state)
    if weights == "teacher":
        ema = state.pop(EMA_KEY, None)
        if ema is None:
            raise ExtractError(f"{path} holds no EMA teacher (no {EMA_KEY!r} entry: a fine-tuned, converted or exported "
                               "student); use weights=student or the pretraining checkpoint")
        state.pop(MASTERS_KEY, None)  # the student's fp32 masters would overwrite the teacher's tensors
        state.update(ema)
    if stripped:
        model.remove_pretraining_modules(modality)
    model.load_state_dict(state)
    model.remove_pretraining_modules()
    return model.eval()


def load(path: str, modality: Optional[str] = None, weights: Optional[str] = None) -> Extractor:
    """A d2v_plugin pretraining checkpoint (``d2v_multi``), an official data2vec one, or a folder
    written by ``python -m d2v_plugin.export --to safetensors`` -> ``Extractor``; ``modality``
    picks the encoder of a multimodal model, ``weights`` the student or the EMA teacher (default:
    the student of a checkpoint, what an export folder holds). A fine-tuned checkpoint or its
    export -> ``predict.Predictor`` (an ``Extractor`` of its encoder that also predicts)."""
    from .checkpoints import CheckpointError, PretrainedCheckpointError, finetuned_parts, load_checkpoint, read_pretrained
    from .modules.data2vec import parse_modalities

    if os.path.isdir(path):
        from .export import ExportError, read_export

        try:
            pre = read_export(path, weights)
        except ExportError as e:
            raise ExtractError(str(e)) from e
        if pre["head"] is not None:
            from .predict import finetuned_predictor

            return _fine_tuned_modality(finetuned_predictor(path, pre), modality, path)
    elif not os.path.isfile(path):
        raise ExtractError(f"--checkpoint {path!r}: file not found")
    else:
        try:
            ckpt = load_checkpoint(path, "a d2v_plugin checkpoint (pretraining or fine-tuned) or an official data2vec one")
            ft = finetuned_parts(ckpt)
            if ft is not None:
                if weights not in (None, "student"):
                    raise ExtractError(f"{path}: a fine-tuned checkpoint has no EMA teacher; load it without weights=teacher")
                from .predict import load_finetuned

                return _fine_tuned_modality(load_finetuned(path, ft), modality, path)
            pre = read_pretrained(path, None, ckpt)
        except (CheckpointError, PretrainedCheckpointError) as e:
            raise ExtractError(str(e)) from e
    modalities = parse_modalities(pre["model"].get("modalities", "audio"))
    if modality is None:
        if len(modalities) != 1:
            raise ExtractError(f"{path} has encoders for {', '.join(modalities)}: choose one with --modality")
        modality = modalities[0]
    if modality not in modalities:
        raise ExtractError(f"{path} has no {modality} encoder (modalities={','.join(modalities)}); "
                           "use a checkpoint of that modality or --modality " + modalities[0])
    exported = os.path.isdir(path)  # its weights are already the ones asked for (read_export checks)
    model = build_model(pre["model"], pre["state"], "student" if exported else weights or "student", path, stripped=exported)
    model.remove_pretraining_modules(modality)
    return Extractor(model, modality, pre["task"], pre["task_state"], path)


def _fine_tuned_modality(predictor: Extractor, modality: Optional[str], path: str) -> Extractor:
    if modality not in (None, predictor.modality):
        raise ExtractError(f"{path} is a fine-tuned {predictor.modality} model: it has no {modality} encoder")
    return predictor


def read_inputs(paths: Sequence[str], modality: str) -> List[str]:
    """--input values -> the list of inputs: files, lists (.tsv: root line + relative paths),
    or for text the lines of the given files."""
    items: List[str] = []
    for p in paths:
        if not os.path.isfile(p):
            raise ExtractError(f"--input {p!r}: file not found")
        if modality == "text":
            with open(p, encoding="utf-8", errors="strict") as f:
                try:
                    items += [line.rstrip("\n") for line in f if line.strip()]
                except UnicodeDecodeError as e:
                    raise ExtractError(f"{p}: not UTF-8 text ({e}); fix the file or pass its sentences in UTF-8") from e
        elif p.endswith(".tsv"):  # a speech manifest or an image list: the plugin's own readers check it
            from .data.audio import read_manifest
            from .data.image import read_image_list

            try:
                root, entries = (read_manifest if modality == "audio" else read_image_list)(p)
            except ValueError as e:
                raise ExtractError(str(e)) from e
            items += [os.path.join(root, e[0]) for e in entries]
        else:
            items.append(p)
    if not items:
        raise ExtractError("no input found in " + ", ".join(paths))
    return items


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="d2v_plugin pretraining checkpoint (checkpoint_last.pt), an official data2vec one, or an export folder")
    ap.add_argument("--input", required=True, nargs="+", help="files, a .tsv manifest/list, or (text) files of lines")
    ap.add_argument("--layer", default="last", help=f"which representation: {LAYERS}")
    ap.add_argument("--pool", default="none", choices=["none", "mean"], help="mean over real positions, or none")
    ap.add_argument("--out", required=True, help="OUT.npz (one archive) or a folder (one .npy per input + ids.txt)")
    ap.add_argument("--modality", default=None, help="the encoder of a multimodal checkpoint (audio, image, text)")
    ap.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    ap.add_argument("--weights", default=None, choices=WEIGHTS,
                    help="the student's weights or the EMA teacher's (the model that computed the targets); default: "
                         "the student of a checkpoint, what an export folder holds")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        ex = load(a.checkpoint, a.modality, a.weights)
        inputs = read_inputs(a.input, ex.modality)
        feats = ex.extract(inputs, a.layer, a.pool, a.batch_size, progress=True)
    except ExtractError as e:
        raise SystemExit(f"error: {e}")
    if a.out.endswith(".npz"):
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        np.savez(a.out, ids=np.array(inputs), **{str(i): f for i, f in enumerate(feats)})
    else:
        os.makedirs(a.out, exist_ok=True)
        for i, f in enumerate(feats):
            np.save(os.path.join(a.out, f"{i:06d}.npy"), f)
        with open(os.path.join(a.out, "ids.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{i:06d}\t{x}\n" for i, x in enumerate(inputs))
    print(f"wrote {len(feats)} feature arrays ({ex.modality}, layer {a.layer}, pool {a.pool}) to {a.out}")


if __name__ == "__main__":
    main()
