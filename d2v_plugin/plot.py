"""A PNG of a training run from its log lines: loss, target/prediction variance
(pretraining) and the validation metrics against updates.

    python -m d2v_plugin.plot LOG [LOG ...] --out run.png     # fairseq logs (simple or json format)

Every pretraining and fine-tuning run writes ``training_curves.png`` (and the numbers,
``training_curves.json``) into its ``checkpoint.save_dir`` when it ends, from the very
lines it logged (:class:`RunRecorder`; with ``common.log_format=tqdm`` fairseq shows a bar
instead of the per-interval lines, and the curves hold only the epoch and validation
points). The PNG needs matplotlib: ``pip install -e '.[plot]'`` (``make venv`` installs
it); without it the JSON is still written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Dict, Iterable, List, Tuple

Curves = Dict[str, Dict[str, List[Tuple[int, float]]]]  # {"train"|"valid": {metric: [(update, value)]}}
TRAIN_KEYS = ("loss", "target_var", "pred_var")
VALID_KEYS = ("loss", "wer", "uer", "top1", "f1", "mcc", "pearson")
_NUMBER = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def parse_line(line: str):
    """One fairseq log line -> ("train" | "valid", {metric: value}) or None. Reads the
    simple format (``train_inner ... loss=1.2, ..., num_updates=20``; ``valid on 'valid'
    subset | loss 1.1 | ... | num_updates 20``) and the json format."""
    if "train_inner" in line:
        kind, pairs = "train", re.findall(r"(\w+)=" + _NUMBER, line)
    elif re.search(r"valid on '[^']+' subset", line):
        kind, pairs = "valid", re.findall(r"\| (\w+) " + _NUMBER, line)
    elif line.lstrip().startswith("{") or "{\"" in line:
        try:
            obj = json.loads(line[line.index("{"):])
        except ValueError:
            return None
        if "train_inner" in line or any(k.startswith("train_") for k in obj):
            kind, prefix = "train", "train_"
        elif any(k.startswith("valid_") for k in obj):
            kind, prefix = "valid", "valid_"
        else:
            return None
        pairs = [(k[len(prefix):], v) for k, v in obj.items() if k.startswith(prefix)]
    else:
        return None
    values = {}
    for k, v in pairs:
        try:
            values[k] = float(v)
        except (TypeError, ValueError):
            pass
    return (kind, values) if "num_updates" in values else None


def curves_from_lines(lines: Iterable[str]) -> Curves:
    curves: Curves = {"train": {}, "valid": {}}
    for line in lines:
        parsed = parse_line(line)
        if parsed is None:
            continue
        kind, values = parsed
        update = int(values["num_updates"])
        for k in TRAIN_KEYS if kind == "train" else VALID_KEYS:
            if k in values:
                curves[kind].setdefault(k, []).append((update, values[k]))
    return curves


def plot_curves(curves: Curves, out: str, title: str = "") -> str:
    """-> the PNG path; one panel each: training loss, target/prediction variance (when
    logged), validation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("training loss", curves["train"], ("loss",))]
    if "target_var" in curves["train"] or "pred_var" in curves["train"]:
        panels.append(("target / prediction variance", curves["train"], ("target_var", "pred_var")))
    if curves["valid"]:
        panels.append(("validation", curves["valid"], tuple(k for k in VALID_KEYS if k in curves["valid"])))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, series, keys) in zip(axes[0], panels):
        for k in keys:
            if k in series:
                xs, ys = zip(*series[k])
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k)
        ax.set_title(name)
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class RunRecorder(logging.Handler):
    """Collects fairseq's train_inner and valid log lines of this process; ``write`` turns
    them into ``training_curves.json`` and ``.png`` in the run's checkpoint folder."""

    LOGGER = "fairseq.logging.progress_bar"  # logs under the tag's name (train_inner, train, valid)

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines: List[str] = []

    def emit(self, record):
        try:
            self.lines.append(f"{record.name} {record.getMessage()}")
        except Exception:  # a malformed record must never stop training
            pass

    def attach(self) -> "RunRecorder":
        logging.getLogger(self.LOGGER).addHandler(self)
        return self

    def write(self, save_dir: str, title: str) -> None:
        curves = curves_from_lines(self.lines)
        if not curves["train"]:
            return
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, "training_curves.json"), "w") as f:
            json.dump(curves, f)
        try:
            png = plot_curves(curves, os.path.join(save_dir, "training_curves.png"), title)
            print(f"d2v_plugin: the run's curves: {png}", file=sys.stderr)
        except ImportError:
            print(f"d2v_plugin: curves in {save_dir}/training_curves.json; pip install -e '.[plot]' (matplotlib) "
                  "for training_curves.png", file=sys.stderr)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="fairseq training logs (stdout of fairseq-train / hydra_train.log)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--title", default="", help="figure title (default: the log names)")
    a = ap.parse_args(argv)
    lines: List[str] = []
    for path in a.logs:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path}: file not found")
        with open(path, encoding="utf-8", errors="replace") as f:
            lines += f.readlines()
    curves = curves_from_lines(lines)
    if not curves["train"]:
        raise SystemExit(f"error: {', '.join(a.logs)}: no training log line (train_inner ... num_updates=N) found; "
                         "give the log of a fairseq-train / fairseq-hydra-train run")
    try:
        plot_curves(curves, a.out, a.title or ", ".join(os.path.basename(p) for p in a.logs))
    except ImportError:
        raise SystemExit("error: the plot needs matplotlib: pip install -e '.[plot]'")
    n = sum(len(v) for v in curves["train"].values()) + sum(len(v) for v in curves["valid"].values())
    print(f"wrote {a.out}: {n} points of {', '.join(sorted(set(curves['train']) | set(curves['valid'])))}")


if __name__ == "__main__":
    main()
