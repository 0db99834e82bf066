"""Checkpoints that load safely and survive a killed process.

* fairseq 0.12.x calls ``torch.load`` without ``weights_only``, so the safe loader
  (default since torch 2.6) refuses the Python objects a fairseq checkpoint stores
  (argparse Namespace, OmegaConf containers, fairseq meters). They are data classes,
  not code: allow-list them.
* fairseq writes the first checkpoint file of a save atomically (``.tmp`` + rename) but
  then *copies* it to the others (``checkpoint_last.pt``, ``checkpoint_best.pt``) with a
  plain ``shutil.copyfile``: a job killed during that copy leaves a truncated
  ``checkpoint_last.pt`` that the restart cannot load. Local copies are made atomic
  the same way (copy to ``DST.tmp``, then ``os.replace``).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import typing
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)


def _safe_globals() -> list:
    found = [argparse.Namespace, collections.defaultdict, dict, list, typing.Any]
    try:
        import omegaconf
        from omegaconf import base, dictconfig, listconfig, nodes
    except ImportError:  # without omegaconf only export folders load (fairseq checkpoints pickle its configs)
        return found
    found += [dictconfig.DictConfig, listconfig.ListConfig, base.ContainerMetadata, base.Metadata]
    found += [getattr(nodes, n) for n in dir(nodes) if n.endswith("Node") and isinstance(getattr(nodes, n), type)]
    found.append(omegaconf.base.Node) if hasattr(omegaconf.base, "Node") else None
    try:
        from fairseq.logging import meters

        found += [getattr(meters, n) for n in dir(meters) if n.endswith("Meter") and isinstance(getattr(meters, n), type)]
    except ImportError:
        pass
    return found


if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(_safe_globals())


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """``PathManager.copy`` for local files: the destination is either the old file or the
    complete new one, never a prefix."""
    if os.path.exists(dst_path) and not overwrite:
        return False
    tmp = dst_path + ".tmp"
    shutil.copyfile(src_path, tmp)
    os.replace(tmp, dst_path)
    return True


def _make_checkpoint_copies_atomic() -> None:
    try:
        from fairseq import file_io
    except ImportError:  # loading without fairseq: nothing to patch
        return
    if file_io.IOPathManager is None and not getattr(file_io.PathManager.copy, "atomic", False):
        atomic_copy.atomic = True
        file_io.PathManager.copy = staticmethod(atomic_copy)


_make_checkpoint_copies_atomic()


class CheckpointError(ValueError):
    """A file that cannot be read as the checkpoint a command needs."""


def describe_unreadable(path: str, error: BaseException) -> str:
    """What a file that torch's safe loader could not read is, in one line (empty, truncated,
    not a checkpoint, or a pickle of objects a fairseq checkpoint does not hold)."""
    import zipfile

    size = os.path.getsize(path)
    if size == 0:
        return f"{path} is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(16)
    glob = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "global" in line), "")
    if head[:2] in (b"PK", b"\x80\x02") and glob and "Weights only load failed" in str(error):
        return f"{path} holds Python objects that a fairseq checkpoint does not ({glob[:160]})"
    if head[:2] == b"PK":  # torch's zip format
        if not zipfile.is_zipfile(path):
            return (f"{path} is truncated or corrupted ({size:,} bytes of a zip archive whose end is missing; "
                    "a copy or save was cut short): copy it again or use another checkpoint")
        return f"{path} is a zip archive that torch cannot read as a checkpoint ({str(error).splitlines()[0]})"
    if head[:1] == b"\x80":  # a plain pickle (torch's legacy format)
        return f"{path} is an unreadable or truncated pickle ({size:,} bytes: {str(error).splitlines()[0]})"
    text = head.decode("utf-8", "replace").split("\n")[0]
    return f"{path} is not a PyTorch checkpoint (it starts with {text!r})"


def _safe_load(path: str, need: str) -> dict:
    """torch's safe loader, a fairseq checkpoint's ``model`` entry required; one-line errors."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"{describe_unreadable(path, e)}; {need} is needed") from None
    return _require_model(path, ckpt, need)


def load_checkpoint(path: str, need: str, upgrade: bool = True) -> dict:
    """fairseq's ``load_checkpoint_to_cpu`` with one-line errors: ``need`` says what the
    command expects (e.g. "a d2v_plugin pretraining checkpoint (checkpoint_last.pt)").
    ``upgrade=False``: torch's safe loader only, without fairseq's upgrade of old layouts
    (conversion reads ``cfg`` and ``model`` and nothing else, so trimmed checkpoints do);
    also what happens without fairseq (checkpoints of fairseq >= 0.10 need no upgrade)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found; {need} is needed")
    try:
        from fairseq import checkpoint_utils
    except ImportError:
        upgrade = False
    if not upgrade:
        return _safe_load(path, need)
    try:
        ckpt = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as e:  # say why: torch cannot read it, it is no fairseq checkpoint, or fairseq's upgrade failed
        _safe_load(path, need)
        raise CheckpointError(f"{path} is a torch file but not a complete fairseq checkpoint (fairseq could not "
                              f"read it: {type(e).__name__} {str(e).splitlines()[0][:120]}); {need} is needed") from None
    return _require_model(path, ckpt, need)


def _require_model(path: str, ckpt, need: str) -> dict:
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        kind = f"a dict with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{path} is a torch file but not a fairseq checkpoint ({kind}, no 'model' entry); "
                              f"{need} is needed")
    return ckpt


class PretrainedCheckpointError(ValueError):
    """A pretrained checkpoint that cannot be fine-tuned or extracted from as asked."""


def read_pretrained(path: str, modality: Optional[str], ckpt: Optional[dict] = None) -> Dict[str, Any]:
    """-> {"model": config dict, "task": task settings, "state": weights, "task_state": the
    task's saved state} of a d2v_plugin pretraining checkpoint (or an official data2vec /
    RoBERTa one, converted) with a ``modality`` encoder (any, if None). Needs no fairseq.
    ``ckpt``: the file's contents when the caller has loaded it already."""
    from omegaconf import OmegaConf

    from .modules.data2vec import parse_modalities
    from .official import OFFICIAL_MODELS, convert_checkpoint, model_name

    if ckpt is None:
        try:
            ckpt = load_checkpoint(path, "a d2v_plugin pretraining checkpoint (checkpoint_last.pt of a d2v_multi run) "
                                         "or an official data2vec one")
        except CheckpointError as e:
            raise PretrainedCheckpointError(str(e)) from None
    cfg = ckpt.get("cfg")
    if model_name(cfg) in OFFICIAL_MODELS:
        logger.info("%s: an official %s checkpoint, converted on load", path, model_name(cfg))
        ckpt = convert_checkpoint(ckpt)
        cfg = ckpt["cfg"]
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg is not None and cfg.get("model") else {}
    name = model_cfg.get("_name")
    if name != "d2v_multi":
        origin = model_cfg.get("pretrained_path")
        hint = (f"; it is a fine-tuned {name} checkpoint: use the pretraining checkpoint it started from "
                f"(its model.pretrained_path: {origin})" if origin else "")
        raise PretrainedCheckpointError(
            f"{path}: model {name!r} is neither a d2v_plugin pretraining checkpoint (d2v_multi) nor an official "
            f"data2vec one (data2vec_multi, data2vec_audio, data2vec_text) nor fairseq RoBERTa{hint}"
        )
    if modality is not None and modality not in parse_modalities(model_cfg.get("modalities", "audio")):
        raise PretrainedCheckpointError(f"{path}: the model has no {modality} encoder (modalities={model_cfg['modalities']!r})")
    task = OmegaConf.to_container(cfg.task, resolve=True) if cfg.get("task") is not None else {}
    return {"model": model_cfg, "task": task, "state": ckpt["model"], "task_state": ckpt.get("task_state") or {}}


def audio_normalize(task: Dict[str, Any]) -> bool:
    """Whether the pretraining fed normalised waveforms (speech task: ``normalize``; joint
    multimodal task: ``audio_normalize``)."""
    return bool(task.get("normalize", task.get("audio_normalize", True)))


FINETUNED = ("d2v_ctc", "d2v_audio_classifier", "d2v_text_classifier", "d2v_image_classifier")


def finetuned_parts(ckpt: Dict) -> Optional[Dict[str, Any]]:
    """A loaded fine-tuned checkpoint (``FINETUNED``) -> its parts: name, pretrained model config
    and task settings, fine-tuning model and task config, encoder and head state; None for
    any other checkpoint (``read_pretrained`` says what it is). Needs no fairseq."""
    from omegaconf import OmegaConf

    cfg = ckpt.get("cfg")
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    name = cfg.model.get("_name") if cfg is not None and cfg.get("model") is not None else None
    if name not in FINETUNED:
        return None
    model = OmegaConf.to_container(cfg.model, resolve=True)
    args = model.get("pretrained_args") or {}
    pretrained = dict(args.get("model") or {})
    if name == "d2v_image_classifier" and model.get("input_size"):
        pretrained["image_input_size"] = model["input_size"]  # fine-tuned at another size: the resized position table
    state = ckpt["model"]
    return {"name": name, "pretrained": pretrained, "pretrained_task": args.get("task") or {},
            "model": model, "task": OmegaConf.to_container(cfg.task, resolve=True) if cfg.get("task") is not None else {},
            "encoder": {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")},
            "head": {k: v for k, v in state.items() if not k.startswith("encoder.")}}


def finetuned_file(ft: Dict, name: str, path: str) -> str:
    """A file of the fine-tuning data folder (labels.txt, dict.ltr.txt) that names the model's outputs."""
    f = os.path.join(ft["task"].get("data") or "", name)
    if not os.path.isfile(f):
        raise CheckpointError(f"{path}: the fine-tuning data folder task.data={ft['task'].get('data')!r} has no {name}, "
                              "which names the model's outputs; restore the folder (or copy it) and try again")
    return f


def finetuned_outputs(ft: Dict, path: str) -> list:
    """The names of a fine-tuned model's outputs: the CTC label dictionary's symbols in index
    order (blank ``<s>`` first) or the classes of labels.txt ([] for text regression)."""
    if ft["name"] == "d2v_ctc":
        from .vocab import Vocabulary

        return list(Vocabulary.load(finetuned_file(ft, f"dict.{ft['task'].get('labels', 'ltr')}.txt", path)).symbols)
    with open(finetuned_file(ft, "labels.txt", path), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def finetuned_text_files(ft: Dict, path: str) -> Dict[str, bytes]:
    """dict.txt and spm.model of a fine-tuned text model: the fine-tuning data folder's
    (prep.text_classification copies them), else the pretraining data folder's."""
    files = {}
    dirs = [d for d in (ft["task"].get("data"), ft["pretrained_task"].get("data")) if d]
    for name in ("dict.txt", "spm.model"):
        found = next((os.path.join(d, name) for d in dirs if os.path.isfile(os.path.join(d, name))), None)
        if found is None:
            raise CheckpointError(f"{path}: no {name} in the fine-tuning or pretraining data folder "
                                  f"({', '.join(dirs) or 'none recorded'}); restore one and try again")
        with open(found, "rb") as f:
            files[name] = f.read()
    return files
