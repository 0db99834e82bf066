"""Time to quality: data2vec 2.0 against data2vec 1.0 and the modality's usual method, each
trained by its real implementation through the real fairseq binaries, at equal wall-clock budgets.

    python bench/time_to_quality.py --modality text [--methods d2v_v2,d2v_v1,roberta] [--budget 240]
        [--data DIR] [--reference DIR] [--device cpu|cuda] --out JSON --png PNG

Modalities and their baselines:

* ``text``: ``roberta``, fairseq's own RoBERTa masked LM (`fairseq-train --task masked_lm --arch
  roberta`, RoBERTa's recipe: BERT masking 15 % with 80/10/10, polynomial decay, Adam
  0.9/0.98, no clipping); data2vec with config/pretrain/text/tiny_v2.yaml / tiny_v1.yaml
  (`fairseq-hydra-train`). All three: 4 blocks of 128, 4 heads, FFN 512, the same vocabulary
  and binarised text (examples/text_controls.py builds the commands). ``--data``: a folder
  made by `python -m d2v_plugin.prep.text` (without it, the text demo's news + unlabelled
  review snippets); the probe and fine-tuning use the sample sentiment snippets, encoded with
  that folder's sentencepiece model.
* ``image`` (MAE) and ``audio`` (wav2vec 2.0): not built yet (issue 18); the in-process
  comparison of data2vec 1.0 and 2.0 on images is bench/image_v1_vs_v2.py.

Fair conditions: the same encoder, data, threads and budget for every method; each method's
peak learning rate is tuned the same way (``--lr-factors`` x its recipe's lr, each tried in a
run of ``--tune-fraction`` x the budget and scored by the probe's *validation* accuracy); its
own recipe otherwise. Each method first runs ``--calibrate`` updates to measure its
updates/s, so that a run of ``budget x updates/s`` updates (its schedule planned over that
length) saves ``--snapshots`` evenly spaced checkpoints. A snapshot's time is the run's
fairseq ``wall`` clock at that update minus the time spent writing earlier checkpoints (the
clock stops while a snapshot is taken; probes run after training).

Quality: text, a linear probe of the frozen encoder on the sentiment labels (mean-pooled
output of each block, logistic regression on the labelled training snippets, the block
chosen on the validation movies, accuracy on the held-out test movies). The final snapshot of
every method is also fine-tuned as in the demo (config/finetune/text/tiny.yaml, ``--ft-seeds``)
and scored on the test movies, to check the probe's ranking.

Output: ``--out`` JSON with each method's (seconds, quality) points, its chosen lr and
fine-tuned score, and for each baseline the time data2vec 2.0 needed to reach the baseline's
final quality as a speedup (the baseline's time / data2vec 2.0's time, linear between
snapshots); ``--png`` plots every method's curve.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
from plot import line_chart  # noqa: E402

BASELINE = {"text": "roberta", "image": "mae", "audio": "wav2vec2"}
PAPER_SPEEDUP = {"image": 16.4, "audio": 10.6, "text": 2.0}  # data2vec 2.0 vs MAE, wav2vec 2.0, RoBERTa


def wall_clock(log: str) -> tuple:
    """-> ({update: training seconds}, [(update, loss)]) of a fairseq log: the ``wall`` of each
    train_inner line minus the seconds spent writing the checkpoints saved before it."""
    points, losses, writing = {}, [], 0.0
    for line in open(log, errors="replace"):
        w = re.search(r"writing took ([\d.]+) seconds", line)
        if w:
            writing += float(w.group(1))
        m = re.search(r"train_inner.*? loss=([\d.]+|nan|inf).*?num_updates=(\d+).*?[ ,]wall=(\d+)", line)
        if m:
            update = int(m.group(2))
            points[update] = float(m.group(3)) - writing
            losses.append((update, float(m.group(1))))
    return points, losses


def clock_at(clock: dict, update: int) -> float:
    """Training seconds at ``update`` of a run's {update: seconds}, linear between the logged updates
    around it (fairseq logs every log_interval updates; snapshots are planned on those updates)."""
    if update in clock:
        return clock[update]
    logged = sorted(clock)
    before = [u for u in logged if u < update]
    after = [u for u in logged if u > update]
    if not before or not after:
        raise ValueError(f"update {update} lies outside the logged updates {logged[0]}..{logged[-1]}")
    u0, u1 = before[-1], after[0]
    return clock[u0] + (clock[u1] - clock[u0]) * (update - u0) / (u1 - u0)


def plan(seconds: float, ups: float, snaps: int) -> tuple:
    """-> (save_every, log_interval, updates) of a run of ``seconds x ups`` updates with ``snaps``
    evenly spaced snapshots, each one on a logged update (5 log lines between snapshots)."""
    per_snapshot = seconds * ups / snaps
    if per_snapshot < 5:
        return max(1, math.ceil(per_snapshot)), 1, max(1, math.ceil(per_snapshot)) * snaps
    log_interval = math.ceil(per_snapshot / 5)
    save_every = 5 * log_interval
    return save_every, log_interval, save_every * snaps


def run(cmd: list, log: str, env: dict = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}); see {log}:\n{open(log, errors='replace').read()[-3000:]}")


def reach_time(points: list, target: float, higher_is_better: bool):
    """The first time a curve [(seconds, quality)] reaches target, linear between snapshots
    (None if it never does; the first snapshot's time if it already does there)."""
    better = (lambda q: q >= target) if higher_is_better else (lambda q: q <= target)
    prev = None
    for t, q in points:
        if better(q):
            if prev is None or prev[1] == q:
                return t
            t0, q0 = prev
            return t0 + (t - t0) * (target - q0) / (q - q0)
        prev = (t, q)
    return None


def speedups(curves: dict, modality: str, higher_is_better: bool) -> dict:
    """For each baseline: its final quality, the time it took to get there, the time data2vec 2.0
    took to reach it, and the ratio (next to the paper's)."""
    out = {}
    if "d2v_v2" not in curves:
        return out
    for method, points in curves.items():
        if method == "d2v_v2":
            continue
        final = points[-1][1]
        t_base = reach_time(points, final, higher_is_better)
        t_v2 = reach_time(curves["d2v_v2"], final, higher_is_better)
        out[method] = {"final_quality": final, "baseline_seconds": round(t_base, 1),
                       "d2v_v2_seconds": None if t_v2 is None else round(t_v2, 1),
                       "speedup": None if t_v2 is None else round(t_base / t_v2, 2),
                       "paper_speedup": PAPER_SPEEDUP[modality] if method == BASELINE[modality] else None}
    return out


class Text:
    """Text: data2vec 1.0 / 2.0 and RoBERTa on the same binarised text; sentiment probe and fine-tuning."""

    methods = ("d2v_v2", "d2v_v1", "roberta")
    metric, higher_is_better = "linear-probe test accuracy %", True

    def __init__(self, a, work: str):
        import text_controls as tc
        from text_demo import build_data

        self.tc, self.a, self.work = tc, a, work
        if a.data:
            missing = [f for f in ("dict.txt", "spm.model", "train.bin") if not os.path.isfile(f"{a.data}/{f}")]
            if missing:
                sys.exit(f"--data {a.data}: no {', '.join(missing)}; make the folder with "
                         "`python -m d2v_plugin.prep.text RAW.txt --dest DIR`")
        self.data, self.cls = build_data(work, a.labelled, data=os.path.abspath(a.data) if a.data else "")
        self.raw = f"{work}/text"

    def recipe(self, method: str) -> dict:
        return self.tc.tiny_recipe("tiny_v1" if method == "roberta" else "tiny_" + method[-2:])

    def default_lr(self, method: str) -> float:
        return float(self.recipe(method)["optimization"]["lr"][0])

    def warmup(self, method: str) -> int:
        return int(self.recipe(method)["lr_scheduler"]["warmup_updates"])

    def command(self, method: str, lr: float, updates: int, save_every: int, log_interval: int, folder: str) -> tuple:
        """-> (command, environment) of one pretraining run."""
        a = argparse.Namespace(updates=[f"{method}={updates}"], budget=self.a.budget, roberta_lr=lr, reference="",
                               bf16=False, device=self.a.device,
                               set=[] if method == "roberta" else [f"optimization.lr=[{lr}]"])
        cmd = self.tc.pretrain_command(method, self.data, f"{folder}/ckpt", f"{folder}/hydra", updates, self.a.seed, a,
                                       save_every=save_every, log_interval=log_interval,
                                       warmup=min(self.warmup(method), updates // 2))  # short runs: half warm-up at most
        env = dict(os.environ, OMP_NUM_THREADS=str(self.a.threads))
        return cmd, env

    def checkpoint(self, method: str, path: str) -> str:
        """-> a d2v_plugin checkpoint of the snapshot (RoBERTa's converted, like official data2vec ones)."""
        if method.startswith("d2v"):
            return path
        out = path[:-3] + "_d2v.pt"
        if not os.path.isfile(out):
            subprocess.run([sys.executable, "-m", "d2v_plugin.convert", "--from-fairseq", path, "--out", out, "--dict",
                            f"{self.data}/dict.txt", "--spm", f"{self.data}/spm.model"], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
        return out

    def probe(self, ckpt: str) -> dict:
        """-> {"valid": %, "test": %, "layer": block}."""
        return self.tc.probe(ckpt, self.raw, labelled=self.a.labelled)

    def finetune(self, ckpt: str, method: str, folder: str) -> dict:
        a = argparse.Namespace(ft_updates=self.a.ft_updates, ft_set=[])
        runs = [self.tc.finetune(ckpt, False, s, self.cls, folder, f"{method}_ft_s{s}", a) for s in self.a.ft_seeds]
        tests = [t for t, _ in runs]
        return {"test": round(statistics.mean(tests), 2), "runs": tests,
                "std": round(statistics.stdev(tests), 2) if len(tests) > 1 else 0.0}


def read_list(tsv: str) -> list:
    """A prep.image_folder split list -> [(image path, label)]."""
    with open(tsv, encoding="utf-8") as f:
        root = f.readline().rstrip("\n")
        return [(os.path.join(root, rel), label) for rel, label in (ln.rstrip("\n").split("\t") for ln in f if ln.strip())]


class Image:
    """Images: data2vec 1.0 / 2.0 (config/pretrain/image/tiny_v1.yaml / tiny_v2.yaml) and the official
    MAE of examples/data2vec (``mae`` model, ``mae_image_pretraining`` task, base_mae_imagenet.yaml at
    the same encoder size, run in the reference environment); linear probe and fine-tuning."""

    methods = ("d2v_v2", "d2v_v1", "mae")
    metric, higher_is_better = "linear-probe test top-1 %", True
    # MAE's base decoder (512 wide, 8 blocks, 16 heads of 32) scaled with the encoder (768 x 12 -> 128 x 4)
    MAE_DECODER = {"decoder_embed_dim": 96, "decoder_depth": 3, "decoder_num_heads": 3}

    def __init__(self, a, work: str):
        from image_v1_vs_v2 import make_images

        self.a, self.work = a, work
        self.lists = os.path.abspath(a.data) if a.data else make_images(work, 5000, 1000)
        missing = [f for f in ("train.tsv", "valid.tsv", "labelled.tsv", "labels.txt") if not os.path.isfile(f"{self.lists}/{f}")]
        if missing:
            sys.exit(f"--data {self.lists}: no {', '.join(missing)}; make the folder with `python -m "
                     "d2v_plugin.prep.image_folder IMAGES --dest DIR --labelled N` (IMAGES/train and IMAGES/valid in class "
                     "folders: the probe and fine-tuning need labels)")
        self.labels = [ln.strip() for ln in open(f"{self.lists}/labels.txt") if ln.strip()]
        labelled = read_list(f"{self.lists}/labelled.tsv")
        unlabelled = [x for x in read_list(f"{self.lists}/train.tsv") if x not in set(labelled)]
        import random

        random.Random(a.seed).shuffle(unlabelled)  # the probe's validation: training images outside labelled.tsv
        self.probe_splits = {"train": labelled, "valid": unlabelled[:len(labelled)],
                             "test": read_list(f"{self.lists}/valid.tsv")}
        if any(not label for split in self.probe_splits.values() for _, label in split):
            sys.exit(f"--data {self.lists}: the probe needs labelled train/ and valid/ images (class folders)")

    def recipe(self, method: str) -> dict:
        from omegaconf import OmegaConf

        name = "tiny_v1" if method == "d2v_v1" else "tiny_v2"  # mae: centred on the same lr and warm-up as data2vec 2.0
        return OmegaConf.to_container(OmegaConf.load(f"{ROOT}/config/pretrain/image/{name}.yaml"))

    def default_lr(self, method: str) -> float:
        return float(self.recipe(method)["optimization"]["lr"][0])

    def warmup(self, method: str) -> int:
        return int(self.recipe(method)["lr_scheduler"]["warmup_updates"])

    def mae_root(self) -> str:
        """An ImageFolder root (ROOT/train/all/...) of the listed training images, as symlinks: MAE's
        dataset reads torchvision's ImageFolder, the plugin's methods the list itself."""
        root = f"{self.work}/mae_imagefolder"
        folder = f"{root}/train/all"
        images = [path for path, _ in read_list(f"{self.lists}/train.tsv")]
        if not os.path.isdir(folder) or len(os.listdir(folder)) != len(images):
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(folder)
            for i, path in enumerate(images):
                os.symlink(path, f"{folder}/{i:07d}{os.path.splitext(path)[1]}")
        return root

    def command(self, method: str, lr: float, updates: int, save_every: int, log_interval: int, folder: str) -> tuple:
        """-> (command, environment) of one pretraining run."""
        cpu = str(self.a.device == "cpu").lower()
        warmup = min(self.warmup(method), updates // 2)  # short runs: half warm-up at most
        ckpt = [f"hydra.run.dir={folder}/hydra", f"checkpoint.save_dir={folder}/ckpt", f"common.seed={self.a.seed}",
                f"optimization.max_update={updates}", f"optimization.lr=[{lr}]", "dataset.disable_validation=true",
                f"checkpoint.save_interval_updates={save_every}", "checkpoint.keep_interval_updates=-1",
                "checkpoint.no_epoch_checkpoints=true", "common.log_format=simple", f"common.log_interval={log_interval}",
                f"common.cpu={cpu}", "common.fp16=false", "dataset.num_workers=1"]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.a.threads))
        if method.startswith("d2v"):
            from demo_common import BIN, user_dir

            return [f"{BIN}/fairseq-hydra-train", "--config-dir", f"{ROOT}/config/pretrain/image", "--config-name",
                    "tiny_" + method[-2:], f"task.data={self.lists}", f"common.user_dir={user_dir()}",
                    f"model.ema_anneal_end_step={updates}", "dataset.validate_interval_updates=0",
                    f"lr_scheduler.warmup_updates={warmup}", *ckpt], env
        if not self.a.reference:
            sys.exit("mae: needs --reference DIR (the environment made by ../shared/reference/setup_reference.sh)")
        ref = os.path.abspath(self.a.reference)
        d2v = f"{ref}/root/examples/data2vec"
        env["PYTHONPATH"] = f"{ref}/root"  # the official code imports examples.data2vec.*
        m = self.recipe("d2v_v2")["model"]
        return [f"{ref}/venv/bin/python", f"{HERE}/official_mae.py", "--config-dir", f"{d2v}/config/vision/pretraining",
                "--config-name", "base_mae_imagenet", f"common.user_dir={d2v}", f"task.data={self.mae_root()}",
                # the yaml's task and model are untyped dicts to Hydra: fields it does not set are added (++)
                f"++task.input_size={m['image_input_size']}", f"++model.input_size={m['image_input_size']}",
                f"++model.patch_size={m['image_patch_size']}", f"++model.embed_dim={m['embed_dim']}",
                f"++model.depth={m['depth']}", f"++model.num_heads={m['num_heads']}",
                *(f"++model.{k}={v}" for k, v in self.MAE_DECODER.items()),
                f"dataset.batch_size={self.recipe('d2v_v2')['dataset']['batch_size']}",
                "distributed_training.distributed_world_size=1", "common.tensorboard_logdir=null",
                *(f"optimizer.groups.{g}.lr_float={lr}" for g in ("with_decay", "no_decay")),
                *(f"optimizer.groups.{g}.lr_scheduler.warmup_updates={warmup}" for g in ("with_decay", "no_decay")),
                *ckpt], env

    def checkpoint(self, method: str, path: str) -> str:
        """-> a d2v_plugin checkpoint of the snapshot (MAE's converted: its encoder as a pre-LN d2v_multi model)."""
        if method.startswith("d2v"):
            return path
        out = path[:-3] + "_d2v.pt"
        if not os.path.isfile(out):
            subprocess.run([sys.executable, "-m", "d2v_plugin.convert", "--from-fairseq", path, "--out", out], check=True,
                           cwd=ROOT, stdout=subprocess.DEVNULL)
        return out

    def probe(self, ckpt: str) -> dict:
        """Every block's mean-pooled patch outputs, and the final output (after the final norm of
        pre-LN models), each probed; the layer chosen on validation -> {"valid", "test", "layer"}."""
        import numpy as np
        import torch

        import d2v_plugin
        from d2v_plugin.probe import best_layer_probe

        ex = d2v_plugin.load(ckpt)
        torch.set_num_threads(self.a.threads)
        feats, y = {}, {}
        for split, items in self.probe_splits.items():
            paths = [p for p, _ in items]
            blocks = np.stack(ex.extract(paths, layer="all", pool="mean", batch_size=250))  # (N, L, D)
            final = np.stack(ex.extract(paths, layer="last", pool="mean", batch_size=250))[:, None]  # (N, 1, D)
            feats[split] = torch.from_numpy(np.concatenate([blocks, final], 1)).float()
            y[split] = torch.tensor([self.labels.index(label) for _, label in items])
        names = [*range(1, feats["train"].shape[1]), "final"]
        return best_layer_probe(feats, y, names)

    def finetune(self, ckpt: str, method: str, folder: str) -> dict:
        """config/finetune/image/tiny.yaml on labelled.tsv, as in the demo; top-1 on the valid split."""
        from demo_common import fairseq_validate, finetune_runs

        def evaluate(best, log):
            return {"top1": fairseq_validate(self.lists, "d2v_image_classification", best, "valid", 128, log)["top1"]}

        os.makedirs(folder, exist_ok=True)
        tests = []
        for seed in self.a.ft_seeds:
            r = finetune_runs(folder, f"{method}_s{seed}", "config/finetune/image", self.lists, ckpt, seed,
                              {"pretrained": ("false", self.a.ft_updates, [])}, evaluate, "dataset.train_subset=labelled")
            tests.append(r["pretrained"]["top1"])
        return {"test": round(statistics.mean(tests), 2), "runs": tests,
                "std": round(statistics.stdev(tests), 2) if len(tests) > 1 else 0.0}


MODALITIES = {"text": Text, "image": Image}


def snapshots(folder: str) -> list:
    """-> [(update, path)] of the checkpoints a run saved, in order."""
    found = []
    for name in os.listdir(f"{folder}/ckpt"):
        m = re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", name)
        if m:
            found.append((int(m.group(1)), f"{folder}/ckpt/{name}"))
    return sorted(found)


def train(mod, method: str, lr: float, seconds: float, ups: float, folder: str, snaps: int) -> dict:
    """One pretraining run of ``seconds x ups`` updates with ``snaps`` checkpoints -> its log's facts."""
    save_every, log_interval, updates = plan(seconds, ups, snaps)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    cmd, env = mod.command(method, lr, updates, save_every, log_interval, folder)
    start = time.time()
    run(cmd, f"{folder}/log", env)
    clock, losses = wall_clock(f"{folder}/log")
    if not losses or any(not math.isfinite(v) for _, v in losses):
        sys.exit(f"{method}: no finite training loss in {folder}/log")
    took = clock[max(clock)]
    if not 0.67 < took / seconds < 1.5:  # the calibrated rate did not hold: the machine's load changed
        print(f"WARNING: {method}: {updates} updates took {took:.0f} s of training, planned {seconds:.0f} s; "
              "run the benchmark on an otherwise idle machine", file=sys.stderr, flush=True)
    return {"lr": lr, "updates": updates, "save_every": save_every, "command": " ".join(cmd),
            "process_seconds": round(time.time() - start, 1), "clock": clock, "losses": losses}


def updates_per_second(mod, method: str, lr: float, updates: int, folder: str) -> float:
    """Calibration: the rate of the second half of a short run (the first includes start-up)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    cmd, env = mod.command(method, lr, updates, updates, max(1, updates // 10), folder)
    run(cmd, f"{folder}/log", env)
    clock, _ = wall_clock(f"{folder}/log")
    (u0, t0), (u1, t1) = sorted(clock.items())[len(clock) // 2 - 1], sorted(clock.items())[-1]
    return (u1 - u0) / max(t1 - t0, 1e-3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", required=True, choices=("audio", "image", "text"), help="what to pretrain on")
    ap.add_argument("--methods", default="", help="comma-separated (default: d2v_v2, d2v_v1 and the modality's baseline)")
    ap.add_argument("--budget", type=float, default=240, help="pretraining wall-clock seconds per method")
    ap.add_argument("--snapshots", type=int, default=6, help="probed checkpoints per run, every budget/N seconds")
    ap.add_argument("--lr-factors", default="0.5,1,2", help="peak lrs tried per method, as factors of its recipe's lr")
    ap.add_argument("--tune-fraction", type=float, default=0.25, help="length of each lr trial, as a fraction of the budget")
    ap.add_argument("--calibrate", type=int, default=50, help="updates of each method's speed calibration")
    ap.add_argument("--data", default="", help="a prepared data folder of the modality (default: the sample data)")
    ap.add_argument("--reference", default="", help="environment made by ../shared/reference/setup_reference.sh")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every method trains")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of every run (OMP_NUM_THREADS)")
    ap.add_argument("--labelled", type=int, default=2000, help="labelled training examples of the probe and fine-tuning")
    ap.add_argument("--ft-updates", type=int, default=400, help="fine-tuning updates of the final snapshots")
    ap.add_argument("--ft-seeds", default="1", help="fine-tuning seeds of the final snapshots")
    ap.add_argument("--seed", type=int, default=1, help="pretraining seed")
    ap.add_argument("--work", default="data/bench/ttq", help="working folder (sample data, runs)")
    ap.add_argument("--out", default="", help="JSON (default: data/bench/time_to_quality_MODALITY.json)")
    ap.add_argument("--png", default="", help="plot (default: beside --out)")
    a = ap.parse_args()
    if a.modality not in MODALITIES:
        sys.exit(f"--modality {a.modality}: not built yet (issue 18); bench/image_v1_vs_v2.py compares data2vec 1.0 "
                 "and 2.0 on images")
    a.out = a.out or f"data/bench/time_to_quality_{a.modality}.json"
    a.png = a.png or os.path.splitext(a.out)[0] + ".png"
    a.ft_seeds = [int(s) for s in a.ft_seeds.split(",")]
    factors = [float(f) for f in a.lr_factors.split(",")]
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    mod = MODALITIES[a.modality](a, work)
    methods = [m for m in a.methods.split(",") if m] or list(mod.methods)
    unknown = [m for m in methods if m not in mod.methods]
    if unknown:
        sys.exit(f"--methods: unknown for {a.modality}: {', '.join(unknown)} (choose from {', '.join(mod.methods)})")
    runs = f"{work}/{a.modality}_runs"
    results = {}
    for method in methods:
        base_lr = mod.default_lr(method)
        ups = updates_per_second(mod, method, base_lr, a.calibrate, f"{runs}/{method}_calibrate")
        print(f"{method}: {ups:.2f} updates/s", flush=True)
        trials = {}
        for f in factors:  # the same small lr search for every method, scored on validation
            lr = base_lr * f
            r = train(mod, method, lr, a.budget * a.tune_fraction, ups, f"{runs}/{method}_lr{lr:g}", 1)
            trials[f"{lr:g}"] = mod.probe(mod.checkpoint(method, snapshots(f"{runs}/{method}_lr{lr:g}")[-1][1]))
            print(f"{method}: lr {lr:g} -> probe {trials[f'{lr:g}']}", flush=True)
        lr = float(max(trials, key=lambda k: trials[k]["valid"]))
        r = train(mod, method, lr, a.budget, ups, f"{runs}/{method}", a.snapshots)
        points = []
        for update, path in snapshots(f"{runs}/{method}"):
            start = time.time()
            p = mod.probe(mod.checkpoint(method, path))
            points.append({"update": update, "seconds": round(clock_at(r["clock"], update), 1), **p,
                           "probe_seconds": round(time.time() - start, 1)})
            print(f"{method}: {points[-1]}", flush=True)
        final = mod.checkpoint(method, snapshots(f"{runs}/{method}")[-1][1])
        results[method] = {"calibrated_ups": round(ups, 3), "lr_trials": trials, "lr": lr, "snapshots": points,
                           "finetune": mod.finetune(final, method, f"{runs}/{method}_finetune"),
                           **{k: r[k] for k in ("updates", "command", "process_seconds", "losses")}}
        write(a, mod, results)
    print(summary(a, mod, results))


def write(a, mod, results: dict) -> None:
    curves = {m: [(p["seconds"], p["test"]) for p in r["snapshots"]] for m, r in results.items()}
    report = {"command": " ".join(sys.argv), "modality": a.modality, "budget_s": a.budget, "device": a.device,
              "threads": a.threads, "metric": mod.metric, "lr_factors": a.lr_factors, "results": results,
              "speedups": speedups(curves, a.modality, mod.higher_is_better)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    line_chart({m: pts for m, pts in curves.items()}, a.png,
               f"{a.modality}: {mod.metric} vs pretraining time ({a.device}, {a.threads} threads)",
               "pretraining seconds", mod.metric)


def ranking(scores: dict, higher_is_better: bool) -> str:
    """{method: score} -> "a > b = c" (best first, equal scores tied)."""
    order = sorted(scores, key=lambda m: -scores[m] if higher_is_better else scores[m])
    return "".join((" = " if scores[m] == scores[order[i - 1]] else " > ") + m if i else m for i, m in enumerate(order))


def summary(a, mod, results: dict) -> str:
    rows = [f"{'method':<10} {'lr':>8} {'updates':>8} {'seconds':>8} {'probe %':>8} {'fine-tuned %':>13}"]
    for m, r in results.items():
        last = r["snapshots"][-1]
        rows.append(f"{m:<10} {r['lr']:>8g} {r['updates']:>8d} {last['seconds']:>8.0f} {last['test']:>8.2f} "
                    f"{r['finetune']['test']:>13.2f}")
    curves = {m: [(p["seconds"], p["test"]) for p in r["snapshots"]] for m, r in results.items()}
    for base, s in speedups(curves, a.modality, mod.higher_is_better).items():
        if s["speedup"] is None:
            rows.append(f"d2v_v2 does not reach {base}'s final {s['final_quality']:.2f} within the budget")
        else:
            rows.append(f"d2v_v2 reaches {base}'s final {s['final_quality']:.2f} after {s['d2v_v2_seconds']:.0f} s, "
                        f"{base} after {s['baseline_seconds']:.0f} s: {s['speedup']:.2f}x"
                        + (f" (paper: {s['paper_speedup']}x)" if s["paper_speedup"] else ""))
    probe_rank = ranking({m: r["snapshots"][-1]["test"] for m, r in results.items()}, mod.higher_is_better)
    ft_rank = ranking({m: r["finetune"]["test"] for m, r in results.items()}, mod.higher_is_better)
    rows.append(f"ranking by probe: {probe_rank}; by fine-tuning: {ft_rank}"
                + ("" if probe_rank == ft_rank else " (they disagree)"))
    rows.append(f"wrote {a.out} and {a.png}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
