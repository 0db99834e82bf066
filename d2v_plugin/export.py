"""Models that leave fairseq.

    python -m d2v_plugin.export CKPT --to safetensors --out DIR [--weights student|teacher]
    python -m d2v_plugin.export CKPT --to hf --out DIR [--weights student|teacher]

``--to safetensors``: ``DIR/config.json`` (the model config, the task settings the inputs
need, which weights) + ``DIR/model.safetensors`` (the encoder without the teacher, decoders
and regression head) + for text ``dict.txt`` and ``spm.model``. ``d2v_plugin.load(DIR)`` reads
it without fairseq. ``--to hf``: a folder that ``transformers.AutoModel.from_pretrained``
loads, for the architectures a transformers class computes exactly (``d2v_plugin/hf.py``).
CKPT: a d2v_plugin pretraining checkpoint, an official data2vec / fairseq RoBERTa one, or a
fine-tuned one (``d2v_ctc``, ``d2v_audio_classifier``, ``d2v_text_classifier``,
``d2v_image_classifier``): its encoder, head and output names (letters, classes), which
``d2v_plugin.load(DIR)`` reads as a ``Predictor``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional, Sequence

import torch

FORMAT = "d2v_plugin"
FORMAT_VERSION = 2  # 1: encoders; 2: also fine-tuned models (config.json "head"), written only for those


class ExportError(ValueError):
    """A checkpoint or folder that cannot be exported or read back as asked."""


def _text_files(pre: Dict, path: str) -> Dict[str, bytes]:
    """dict.txt and spm.model of a text model: saved in the checkpoint, else in task.data."""
    out = {}
    for name, key in (("dict.txt", "dictionary"), ("spm.model", "spm_model")):
        saved = pre["task_state"].get(key)
        if saved is not None:
            out[name] = bytes(saved.numpy().tobytes())
        else:
            f = os.path.join(pre["task"].get("data") or "", name)
            if not os.path.isfile(f):
                raise ExportError(f"{path}: the checkpoint holds no {name} and task.data={pre['task'].get('data')!r} "
                                  f"has none: pass a checkpoint of d2v_text_pretraining, restore its data folder, or "
                                  f"export the weights alone with --no-vocabulary")
            out[name] = open(f, "rb").read()
    return out


def _json_safe(d: Dict) -> Dict:
    return json.loads(json.dumps(d, default=str))


def write_safetensors(ckpt_path: str, out: str, weights: str = "student", vocabulary: bool = True) -> Dict:
    """CKPT -> DIR with config.json, model.safetensors (and the text vocabulary); returns the config.
    ``vocabulary=False``: a text model without dict.txt / spm.model (it then reads token ids only).
    A fine-tuned checkpoint: the encoder and its head, and the names of the head's outputs."""
    from .checkpoints import CheckpointError, PretrainedCheckpointError, finetuned_parts, load_checkpoint, read_pretrained
    from .extract import ExtractError, build_model
    from .modules.data2vec import parse_modalities

    try:
        ckpt = load_checkpoint(ckpt_path, "a d2v_plugin checkpoint (pretraining or fine-tuned) or an official data2vec one")
        ft = finetuned_parts(ckpt)
        if ft is not None:
            return _write_finetuned(ckpt_path, ft, out, weights, vocabulary)
        pre = read_pretrained(ckpt_path, None, ckpt)
        model = build_model(pre["model"], pre["state"], weights, ckpt_path)
    except (CheckpointError, PretrainedCheckpointError, ExtractError) as e:
        raise ExportError(str(e)) from None
    modalities = parse_modalities(pre["model"].get("modalities", "audio"))
    files = _text_files(pre, ckpt_path) if "text" in modalities and vocabulary else {}
    config = {"format": FORMAT, "format_version": 1, "weights": weights, "modalities": modalities,
              "text_vocabulary": bool(files), "source": os.path.abspath(ckpt_path),
              "model": _json_safe(pre["model"]), "task": _json_safe(pre["task"])}
    return _write(out, config, model.state_dict(), files, ckpt_path)


def _write_finetuned(path: str, ft: Dict, out: str, weights: str, vocabulary: bool) -> Dict:
    """A fine-tuned checkpoint's parts -> DIR: the encoder (``encoder.*``) and head weights, and in
    config.json ``head``: its kind, settings, output names and the fine-tuning config."""
    from .checkpoints import CheckpointError, finetuned_text_files
    from .extract import ExtractError
    from .predict import load_finetuned

    if weights != "student":
        raise ExportError(f"{path}: a fine-tuned checkpoint has no EMA teacher; export it without --weights")
    try:
        p = load_finetuned(path, ft)  # builds the model and checks that the output names fit its head
        files = finetuned_text_files(ft, path) if p.modality == "text" and vocabulary else {}
    except (CheckpointError, ExtractError) as e:
        raise ExportError(str(e)) from None
    from .modules.heads import HEADS

    fine_tuning = {k: v for k, v in ft["model"].items() if k != "pretrained_args"}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights": "student", "modalities": [p.modality],
              "text_vocabulary": bool(files), "source": os.path.abspath(path),
              "model": _json_safe(ft["pretrained"]), "task": _json_safe(ft["pretrained_task"]),
              "head": {"kind": ft["name"], "config": HEADS[ft["name"]].config_from(ft["head"], ft["model"]),
                       "outputs": p.outputs, "model": _json_safe(fine_tuning), "task": _json_safe(ft["task"])}}
    return _write(out, config, p.net.state_dict(), files, path)


def _write(out: str, config: Dict, state: Dict[str, torch.Tensor], files: Dict[str, bytes], path: str) -> Dict:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().clone() for k, v in state.items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ExportError(f"{path}: {len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:3])}): "
                          "a diverged run; export an earlier checkpoint")
    os.makedirs(out, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return config


def read_export(folder: str, weights: Optional[str] = None) -> Dict:
    """DIR of ``write_safetensors`` -> what ``read_pretrained`` returns for a checkpoint (the
    state without pretraining parts), plus ``weights``. Needs neither fairseq nor omegaconf."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        hint = " (a transformers folder: load it with transformers)" if os.path.isfile(
            os.path.join(folder, "model.safetensors")) else ""
        raise ExportError(f"{folder}: no config.json of a d2v_plugin export{hint}; make one with "
                          "`python -m d2v_plugin.export CKPT --to safetensors --out DIR`")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise ExportError(f"{cfg_path}: not valid JSON ({e}); export the checkpoint again") from None
    if config.get("format") != FORMAT:
        raise ExportError(f"{cfg_path} is not a d2v_plugin export (format {config.get('format')!r}; a transformers "
                          "config?): export with `python -m d2v_plugin.export CKPT --to safetensors`")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{cfg_path}: export format {config['format_version']} is newer than this d2v_plugin "
                          f"reads ({FORMAT_VERSION}); upgrade d2v_plugin")
    if weights is not None and weights != config["weights"]:
        raise ExportError(f"{folder} holds the {config['weights']}'s weights, not the {weights}'s: export the checkpoint "
                          f"again with --weights {weights}")
    st = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(st):
        raise ExportError(f"{folder}: model.safetensors is missing; export the checkpoint again")
    try:
        state = load_file(st)
    except Exception as e:  # safetensors raises SafetensorError for truncated or foreign files
        raise ExportError(f"{st} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "export the checkpoint again") from None
    task = dict(config["task"], data=folder)  # the text vocabulary lies beside the weights
    return {"model": config["model"], "task": task, "state": state, "task_state": {}, "weights": config["weights"],
            "head": config.get("head")}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="d2v_plugin pretraining or fine-tuned checkpoint, or an official data2vec / RoBERTa one")
    ap.add_argument("--to", required=True, choices=["safetensors", "hf"], help="d2v_plugin's own folder or transformers'")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--weights", default="student", choices=["student", "teacher"],
                    help="the student's weights or the EMA teacher's")
    ap.add_argument("--no-vocabulary", action="store_true",
                    help="export a text model without dict.txt / spm.model (e.g. an official one, GPT-2 BPE): token ids only")
    a = ap.parse_args(argv)
    from d2v_plugin.export import ExportError as raised  # under `python -m` this module is __main__, not the one hf imports
    try:
        if a.to == "safetensors":
            cfg = write_safetensors(a.checkpoint, a.out, a.weights, not a.no_vocabulary)
            vocab = ", no text vocabulary (token ids only)" if "text" in cfg["modalities"] and not cfg["text_vocabulary"] else ""
            what = (f"fine-tuned {cfg['head']['kind']} ({len(cfg['head']['outputs'])} outputs)" if "head" in cfg else
                    f"{','.join(cfg['modalities'])} encoder ({cfg['weights']} weights{vocab})")
            print(f"wrote {a.out}: {what}, d2v_plugin.load({a.out!r}) reads it")
        else:
            from .hf import write_hf

            what = write_hf(a.checkpoint, a.out, a.weights)
            print(f"wrote {a.out}: transformers {what}")
    except (ExportError, raised) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
