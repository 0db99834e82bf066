"""Does text pretraining pay off? data2vec (this plugin, 2.0 and 1.0) against its controls at
equal pretraining wall time, on the data and sentiment task of `make demo`'s text story.

Methods (``--methods``), each pretrained on the same binarised text (news + unlabelled
training review snippets), the same encoder (depth, width, heads, vocabulary, 128-token
blocks of 16) and the same wall-clock budget (``--budget`` seconds, 2 threads):

* ``d2v_v2`` / ``d2v_v1``: config/pretrain/text/tiny_v2.yaml / tiny_v1.yaml with
  `fairseq-hydra-train` (``--set KEY=VALUE`` tries a change of recipe);
* ``roberta``: fairseq's own RoBERTa masked LM (`fairseq-train --task masked_lm --arch
  roberta`, shrunk to the same size; BERT masking 15 % with 80/10/10, polynomial decay, no
  clipping: RoBERTa's recipe), converted with `python -m d2v_plugin.convert`;
* ``official_v2`` / ``official_v1``: the official data2vec code (``--reference DIR``, made
  by ../shared/reference/setup_reference.sh), its text recipes (config/v2/
  base_text_only_task.yaml, config/text/pretraining/base.yaml) at the tiny size and with
  the tiny YAML's optimisation and EMA settings, converted the same way.

Each method first runs ``--calibrate`` updates to measure its speed, then ``budget x
updates/s`` updates (schedule and EMA annealing over that run, fairseq's ``stop_time_hours``
as the hard limit). Every checkpoint is then scored the same way:

* fine-tuning: config/finetune/text/tiny.yaml on the 2,000 labelled snippets (``--labelled
  N``: N evenly spaced ones, with their own files and keys), one run per ``--seeds``,
  scored on the held-out movies with `fairseq-validate` (accuracy); random initialisation
  of each architecture (2.0 blocks; 1.0 / RoBERTa) with the same seeds is the baseline;
  the best validation accuracy is recorded beside it, to choose between fine-tuning
  variants (``--ft-set``, e.g. the lr) on the validation movies;
* a frozen-encoder probe: the mean-pooled output of every block, logistic regression on
  the 2,000 labelled snippets; the block is chosen on the validation movies, and its test
  accuracy reported.

Writes ``--out`` (JSON) and prints a table with the mean and spread over the seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_common import BIN, PY, REPO, fairseq_validate, hydra_train, losses, sh, user_dir  # noqa: E402
from text_demo import build_data, labelled_suffix, vocab_suffix  # noqa: E402

METHODS = ("d2v_v2", "d2v_v1", "roberta", "official_v2", "official_v1")
ARCH = {"d2v_v2": "v2", "official_v2": "v2", "d2v_v1": "v1", "official_v1": "v1", "roberta": "v1"}


def tiny_recipe(config: str) -> dict:
    """The optimisation and model settings of config/pretrain/text/CONFIG.yaml."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(f"{REPO}/config/pretrain/text/{config}.yaml"))


def pretrain_command(method: str, data: str, save: str, run_dir: str, updates: int, seed: int, a, save_every: int = 0,
                     log_interval: int = 25, warmup: int = 0) -> list:
    """The real command line of one method's pretraining (fairseq binaries of the method's environment).
    save_every: a checkpoint every N updates, all kept (default: one, at the end); warmup: lr
    warm-up updates (default: the tiny YAML's); ``a.device`` (default cpu) picks the device."""
    save_every = save_every or updates
    cpu = getattr(a, "device", "cpu") == "cpu"
    # a hard wall-clock cap, unless the update count was fixed from quiet-machine rates (then the
    # count is the budget, and a busy machine only stretches the wall time)
    stop = "0" if method in dict(x.split("=") for x in a.updates) else f"{a.budget * 1.1 / 3600:.5f}"
    if method in ("d2v_v2", "d2v_v1"):
        return [f"{BIN}/fairseq-hydra-train", "--config-dir", f"{REPO}/config/pretrain/text", "--config-name",
                "tiny_" + method[-2:], f"hydra.run.dir={run_dir}", f"task.data={data}", f"common.user_dir={user_dir()}",
                f"checkpoint.save_dir={save}", f"common.seed={seed}", f"optimization.max_update={updates}",
                f"model.ema_anneal_end_step={updates}", f"optimization.stop_time_hours={stop}",
                "dataset.validate_interval_updates=0", "dataset.disable_validation=true",
                f"checkpoint.save_interval_updates={save_every}", "checkpoint.keep_interval_updates=-1",
                f"common.log_interval={log_interval}", f"common.cpu={str(cpu).lower()}",
                f"common.bf16={str(a.bf16).lower()}", *([f"lr_scheduler.warmup_updates={warmup}"] if warmup else []),
                *a.set]
    t = tiny_recipe("tiny_v2" if method.endswith("v2") else "tiny_v1")
    m, opt = t["model"], t["optimization"]
    for kv in a.set:  # a recipe change tried on the plugin applies to the official code too
        key, value = kv.split("=", 1)
        if key.startswith("model.") and key[6:] in m:
            m[key[6:]] = type(m[key[6:]])(value) if m[key[6:]] is not None else value
    lr, batch, warmup = opt["lr"][0], t["dataset"]["batch_size"], warmup or t["lr_scheduler"]["warmup_updates"]
    if method == "roberta":
        if a.bf16:  # fairseq/options.py: --bf16 sets --tpu, and the trainer then asks torch_xla for a device
            sys.exit("roberta: fairseq-train --bf16 means TPU (fairseq sets --tpu with it); pretrain RoBERTa in fp32")
        return [f"{BIN}/fairseq-train", data, "--task", "masked_lm", "--criterion", "masked_lm", "--arch", "roberta",
                "--encoder-layers", str(m["depth"]), "--encoder-embed-dim", str(m["embed_dim"]),
                "--encoder-ffn-embed-dim", str(4 * m["embed_dim"]), "--encoder-attention-heads", str(m["num_heads"]),
                "--max-positions", str(m["text_max_positions"]), "--tokens-per-sample", str(t["task"]["tokens_per_sample"]),
                "--sample-break-mode", "none", "--batch-size", str(batch), "--optimizer", "adam", "--adam-betas",
                "(0.9,0.98)", "--adam-eps", "1e-6", "--weight-decay", "0.01", "--clip-norm", "0",
                "--lr", str(a.roberta_lr or lr), "--lr-scheduler", "polynomial_decay", "--warmup-updates", str(warmup),
                "--total-num-update", str(updates), "--max-update", str(updates), "--stop-time-hours", stop,
                "--dropout", "0.1", "--attention-dropout", "0.1", "--seed", str(seed), "--save-dir", save,
                "--no-epoch-checkpoints", "--save-interval-updates", str(save_every), *(["--cpu"] if cpu else []),
                "--log-format", "simple", "--log-interval", str(log_interval), "--num-workers", "1",
                "--disable-validation"]
    if not a.reference:
        raise SystemExit(f"{method}: needs --reference DIR (the environment made by ../shared/reference/setup_reference.sh)")
    ref = os.path.abspath(a.reference)
    common = [f"hydra.run.dir={run_dir}", f"task.data={data}", f"task.tokens_per_sample={t['task']['tokens_per_sample']}",
              f"common.user_dir={ref}/root/examples/data2vec", "common.fp16=false", f"common.cpu={str(cpu).lower()}",
              f"common.bf16={str(a.bf16).lower()}", "common.tensorboard_logdir=null", "common.log_format=simple",
              f"common.log_interval={log_interval}", f"common.seed={seed}",
              "distributed_training.distributed_world_size=1", f"checkpoint.save_dir={save}",
              f"checkpoint.save_interval_updates={save_every}", "checkpoint.keep_interval_updates=-1",
              "dataset.num_workers=1", "dataset.disable_validation=true",
              f"dataset.batch_size={batch}", "++dataset.max_tokens=null", f"optimization.max_update={updates}",
              f"optimization.lr=[{lr}]", f"optimization.clip_norm={opt['clip_norm']}",
              f"++optimization.stop_time_hours={stop}", f"model.ema_decay={m['ema_decay']}",
              f"model.ema_end_decay={m['ema_end_decay']}", f"model.ema_anneal_end_step={updates}",
              f"model.average_top_k_layers={m['average_top_k_layers']}"]
    if method == "official_v2":
        return [f"{ref}/venv/bin/fairseq-hydra-train", "--config-dir", f"{ref}/root/examples/data2vec/config/v2",
                "--config-name", "base_text_only_task", *common, f"model.depth={m['depth']}",
                f"model.embed_dim={m['embed_dim']}", f"++model.num_heads={m['num_heads']}",
                f"model.clone_batch={m['clone_batch']}", f"optimizer.groups.default.lr_float={lr}",
                f"optimizer.groups.default.lr_scheduler.warmup_updates={warmup}",
                f"++model.modalities.text.max_source_positions={m['text_max_positions']}",
                f"model.modalities.text.mask_prob={m['text_mask_prob']}",
                f"model.modalities.text.decoder.decoder_dim={m['text_decoder_dim']}",
                f"model.modalities.text.decoder.decoder_layers={m['text_decoder_layers']}"]
    return [f"{ref}/venv/bin/fairseq-hydra-train", "--config-dir", f"{ref}/root/examples/data2vec/config/text/pretraining",
            "--config-name", "base", *common, "task.sample_break_mode=none", f"lr_scheduler.warmup_updates={warmup}",
            f"model.head_layers={m['head_layers']}", f"model.loss_beta={m['loss_beta']}",
            f"model.transformer.max_source_positions={m['text_max_positions']}",
            f"model.transformer.encoder.embed_dim={m['embed_dim']}",
            f"model.transformer.encoder.ffn_embed_dim={4 * m['embed_dim']}",
            f"model.transformer.encoder.layers={m['depth']}",
            f"model.transformer.encoder.attention_heads={m['num_heads']}",
            # base.yaml does not run as shipped with fairseq 0.12.3: transformer.decoder.input_dim
            # interpolates model.decoder.embed_dim, which data2vec_text's config does not have
            f"++model.transformer.decoder.input_dim={m['embed_dim']}",
            f"++model.transformer.decoder.output_dim={m['embed_dim']}"]


def run_logged(cmd: list, log: str, method: str, append: bool = False) -> float:
    """-> seconds; the official code runs with its own PYTHONPATH."""
    env = dict(os.environ)
    if method.startswith("official"):
        ref = os.path.dirname(os.path.dirname(os.path.dirname(cmd[0])))  # REF/venv/bin/fairseq-hydra-train
        env["PYTHONPATH"] = f"{ref}/root/examples/data2vec:{ref}/root"
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "a" if append else "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{method}: pretraining failed ({proc.returncode}); see {log}:\n{open(log).read()[-3000:]}")
    return time.time() - start


def updates_per_second(log: str) -> float:
    """The last ``ups`` of a train_inner line (the first interval includes start-up)."""
    ups = re.findall(r"train_inner.*?ups=([\d.]+)", open(log).read())
    if not ups:
        sys.exit(f"{log}: no updates/s logged")
    return float(ups[-1])


def pretrain_method(method: str, data: str, work: str, a) -> dict:
    """Calibrate, then pretrain for the budget -> checkpoint (d2v_plugin format) and what it took."""
    tag = method + a.tag
    save, log = f"{work}/{tag}_pretrain", f"{work}/{tag}_pretrain.log"
    if os.path.isfile(f"{save}/checkpoint_last.pt") and os.path.isfile(log) and "done training" in open(log).read():
        print(f"{method}: reusing the finished pretraining in {save}", flush=True)
        return finished_pretraining(method, data, save, log, a)
    fixed = dict(x.split("=") for x in a.updates).get(method)
    if fixed:  # updates/s measured beforehand on a quiet machine
        ups = int(fixed) / a.budget
    else:
        cal = f"{work}/{tag}_calibrate"
        shutil.rmtree(cal, ignore_errors=True)
        os.makedirs(cal)
        run_logged(pretrain_command(method, data, f"{cal}/ckpt", f"{cal}/hydra", a.calibrate, a.seed, a), f"{cal}/log", method)
        ups = updates_per_second(f"{cal}/log")
    updates = max(10, int(a.budget * ups))
    run = {"calibrated_ups": ups, "planned_updates": updates}
    resumed = fixed and os.path.isfile(f"{save}/checkpoint_last.pt") and os.path.isfile(log)
    if resumed:  # an interrupted run of a fixed update count: fairseq resumes exactly from checkpoint_last.pt
        walls = re.findall(r"train_inner.*?num_updates=(\d+).*?[ ,]wall=(\d+)", open(log).read())
        at = torch.load(f"{save}/checkpoint_last.pt", map_location="cpu", weights_only=False)["optimizer_history"][-1]["num_updates"]
        before = max((int(w) for u, w in walls if int(u) <= at), default=0)
        print(f"{method}: resuming the interrupted pretraining in {save} at update {at}", flush=True)
        run.update(resumed_at_update=at, seconds_before_resume=before)
    else:
        shutil.rmtree(save, ignore_errors=True)
    seconds = run_logged(pretrain_command(method, data, save, f"{work}/{tag}_hydra", updates, a.seed, a), log, method,
                         append=bool(resumed))
    run["seconds"] = round(seconds + run.get("seconds_before_resume", 0), 1)
    with open(f"{save}/run.json", "w") as f:
        json.dump(run, f)
    return finished_pretraining(method, data, save, log, a)


def finished_pretraining(method: str, data: str, save: str, log: str, a) -> dict:
    run = json.load(open(f"{save}/run.json"))
    done = re.findall(r"num_updates[=\s|]+(\d+)", open(log).read())
    ckpt = f"{save}/checkpoint_last.pt"
    if not method.startswith("d2v"):
        converted = f"{save}/converted.pt"
        sh([PY, "-m", "d2v_plugin.convert", "--from-fairseq", ckpt, "--out", converted, "--dict", f"{data}/dict.txt",
            "--spm", f"{data}/spm.model"])
        ckpt = converted
    curve = losses(log) or [(int(u), float(v)) for v, u in re.findall(r"loss=([\d.]+).*?num_updates=(\d+)", open(log).read())]
    hydra_dir = save[: -len("_pretrain")] + "_hydra"
    return {"checkpoint": ckpt, **run, "updates": int(done[-1]) if done else 0, "loss_curve": curve,
            "command": " ".join(pretrain_command(method, data, save, hydra_dir, run["planned_updates"], a.seed, a))}


def finetune_variant(ft_set: list) -> str:
    """Folder/key suffix of a fine-tuning variant (``--ft-set``), so that runs with other
    fine-tuning settings neither reuse nor overwrite each other's logs and results."""
    return "".join("_" + re.sub(r"[^\w.-]+", "", kv.replace("=", "-")) for kv in ft_set)  # "=" breaks Hydra paths


def best_valid(log: str) -> float:
    """The best validation accuracy of a fine-tuning log (what checkpoint_best was chosen by).
    fairseq logs best_top1 only from the second validation on, so the valid lines' top1 count too."""
    text = open(log).read()
    scores = [float(x) for x in re.findall(r"best_top1 ([\d.]+)", text)]
    scores += [float(x) for x in re.findall(r"valid on 'valid' subset.*?\| top1 ([\d.]+)", text)]
    if not scores:
        sys.exit(f"{log}: no validation accuracy logged (fewer updates than the validation interval?)")
    return max(scores)


def finetune(ckpt: str, random_init: bool, seed: int, cls: str, work: str, tag: str, a) -> tuple:
    """-> (test accuracy, best validation accuracy) of one fine-tuning run (reused when its logs
    are newer than the checkpoint)."""
    done, log = f"{work}/{tag}_test.log", f"{work}/{tag}_ft.log"
    if os.path.isfile(done) and os.path.getmtime(done) > os.path.getmtime(ckpt):
        line = [x for x in open(done).read().splitlines() if "valid on 'test' subset" in x]
        if line:
            return float(re.search(r"\| top1 ([\d.]+)", line[-1]).group(1)), best_valid(log)
    save = f"{work}/{tag}_ft"
    shutil.rmtree(save, ignore_errors=True)
    hydra_train("config/finetune/text", "tiny", f"{work}/{tag}_ft_hydra", log, f"task.data={cls}",
                f"model.pretrained_path={ckpt}", f"model.random_init={str(random_init).lower()}",
                f"common.user_dir={user_dir()}", f"checkpoint.save_dir={save}", f"common.seed={seed}",
                f"optimization.max_update={a.ft_updates}", *a.ft_set)
    m = fairseq_validate(cls, "d2v_text_classification", f"{save}/checkpoint_best.pt", "test", 64, f"{work}/{tag}_test.log")
    shutil.rmtree(save, ignore_errors=True)  # keep the logs, not the fine-tuned weights
    return m["top1"], best_valid(log)


def finetune_seeds(ckpt: str, random_init: bool, seeds: list, cls: str, work: str, key: str, a) -> dict:
    """-> {"finetune": test accuracy over the seeds, "finetune_valid": best validation accuracy}."""
    runs = [finetune(ckpt, random_init, s, cls, work, f"{key}_s{s}", a) for s in seeds]
    return {"finetune": spread([t for t, _ in runs]), "finetune_valid": spread([v for _, v in runs])}


def sentences(path: str):
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [r[0] for r in rows], [r[-1] for r in rows]


def probe(ckpt: str, raw: str, random_seed=None, labelled: int = 2000) -> dict:
    """Block-wise frozen probe -> {"layer": chosen block (1-based), "valid": %, "test": %}."""
    import d2v_plugin
    from d2v_plugin.modules.data2vec import Data2Vec
    from d2v_plugin.probe import best_layer_probe

    ex = d2v_plugin.load(ckpt)
    if random_seed is not None:  # the same architecture, freshly initialised
        torch.manual_seed(random_seed)
        model = Data2Vec(ex.model.settings)
        model.remove_pretraining_modules("text")
        ex.model, ex.encoder = model.eval(), model.modality_encoders["text"]
    splits = {}
    for split, name in (("train", "train_labelled" + labelled_suffix(labelled)), ("valid", "valid"), ("test", "test")):
        text, labels = sentences(f"{raw}/sentiment/{name}.tsv")
        feats = torch.from_numpy(np.stack(ex.extract(text, layer="all", pool="mean", batch_size=64)))
        splits[split] = (feats, labels)
    classes = sorted(set(splits["train"][1]))
    y = {s: torch.tensor([classes.index(v) for v in splits[s][1]]) for s in splits}
    return best_layer_probe({s: splits[s][0] for s in splits}, y)


def spread(values):
    return {"mean": round(statistics.mean(values), 2), "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "runs": values}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="data/demo", help="working folder (the text demo's data is built or reused there)")
    ap.add_argument("--methods", default="d2v_v2,roberta", help=f"comma-separated: {', '.join(METHODS)}")
    ap.add_argument("--budget", type=float, default=840, help="pretraining wall-clock seconds per method")
    ap.add_argument("--calibrate", type=int, default=60, help="updates of the speed-calibration run")
    ap.add_argument("--reference", default="", help="environment of setup_reference.sh (official_v1, official_v2)")
    ap.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds")
    ap.add_argument("--seed", type=int, default=1, help="pretraining seed")
    ap.add_argument("--labelled", type=int, default=2000, help="labelled training snippets")
    ap.add_argument("--ft-updates", type=int, default=400, help="fine-tuning updates per run")
    ap.add_argument("--vocab-size", type=int, default=8000,
                    help="sentencepiece pieces of the pretraining data (every method and baseline; own folders and keys)")
    ap.add_argument("--set", action="append", default=[],
                    help="KEY=VALUE override of the data2vec pretraining (repeatable); model.* keys of the tiny YAML "
                         "apply to the official code too")
    ap.add_argument("--updates", action="append", default=[], metavar="METHOD=N",
                    help="pretraining updates of METHOD instead of calibrating (N = budget x its quiet-machine updates/s)")
    ap.add_argument("--ft-set", action="append", default=[],
                    help="KEY=VALUE override of the fine-tuning (repeatable); the runs and JSON keys get it as a suffix")
    ap.add_argument("--roberta-lr", type=float, default=0.0, help="RoBERTa's peak lr (default: the tiny YAML's)")
    ap.add_argument("--bf16", action="store_true",
                    help="pretrain in bf16 (common.bf16; data2vec methods: the plugin keeps its teacher fp32, the "
                         "official code casts it to bf16; not roberta: fairseq-train's --bf16 means TPU); adds _bf16 "
                         "to the tag")
    ap.add_argument("--tag", default="", help="suffix of this run's folders and JSON keys (recipe variants)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the random-init baselines (already measured)")
    ap.add_argument("--out", default="data/demo/text_controls.json", help="results (merged into an existing file)")
    a = ap.parse_args()
    if a.bf16 and "_bf16" not in a.tag:
        a.tag += "_bf16"
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    seeds = [int(s) for s in a.seeds.split(",")]
    work = os.path.abspath(a.work)
    data, cls = build_data(work, a.labelled, vocab_size=a.vocab_size)
    raw, ctl = f"{work}/text", f"{work}/text_controls{vocab_suffix(a.vocab_size)}"  # other vocabularies: own runs
    os.makedirs(ctl, exist_ok=True)
    results = json.load(open(a.out)) if os.path.isfile(a.out) else {}
    for method in methods:
        variant = labelled_suffix(a.labelled) + vocab_suffix(a.vocab_size) + finetune_variant(a.ft_set)
        key, baseline = method + a.tag + variant, f"random_{ARCH[method]}{variant}"
        r = pretrain_method(method, data, ctl, a)
        r.update(finetune_seeds(r["checkpoint"], False, seeds, cls, ctl, key, a))
        r["probe"] = probe(r["checkpoint"], raw, labelled=a.labelled)
        r["set"] = a.set if method != "roberta" else []
        results[key] = r
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"{key}: {r['updates']} updates in {r['seconds']:.0f} s; fine-tuned {r['finetune']}; probe {r['probe']}", flush=True)
        if not a.no_baseline and baseline not in results:
            results[baseline] = {**finetune_seeds(r["checkpoint"], True, seeds, cls, ctl, baseline, a),
                                 "probe": probe(r["checkpoint"], raw, random_seed=seeds[0], labelled=a.labelled)}
            print(f"{baseline}: {results[baseline]}", flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{'method':<22} {'updates':>7} {'sec':>6} {'fine-tuned acc % (mean +- std)':>31} {'valid %':>8} {'probe %':>8}")
    for key, r in results.items():
        ft, valid = r["finetune"], r.get("finetune_valid", {}).get("mean", float("nan"))
        print(f"{key:<22} {r.get('updates', 0):>7} {r.get('seconds', 0):>6.0f} {ft['mean']:>24.2f} +- {ft['std']:<4.2f} "
              f"{valid:>8.2f} {r['probe']['test']:>8.2f}")
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
