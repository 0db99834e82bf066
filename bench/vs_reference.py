"""d2v_plugin beside the official fairseq data2vec 2.0 code, same settings, same run.

    bash ../shared/reference/setup_reference.sh REF          # once: the official code in its own venv
    python bench/vs_reference.py --ref REF --work DIR [--modalities audio,text,image] [--rounds 3]
                                 [--precision fp32,bf16]

For each round and modality it runs ``official_bench.sh`` (the reference through
``fairseq-hydra-train`` with its base v2 config shrunk to depth 4, width 256, 4 heads,
clone_batch 8, top-4 targets, on small synthetic/Bible data it generates), then
d2v_plugin's ``fairseq-hydra-train`` with the matching shipped config
(``config/pretrain/<modality>/base_v2.yaml``) and the same overrides, the same data,
batch, updates and threads. By default d2v_plugin runs in the reference's venv (same
torch, same fairseq; only ``editdistance`` is added there), so the comparison isolates
the model code. Seconds per update = median over the logged intervals (first dropped);
peak memory = peak RSS from ``/usr/bin/time -v``. Prints a table (medians over rounds,
plus the per-round speedups) and writes JSON.

``--precision fp32,bf16``: each implementation also with fairseq's ``common.bf16=true`` (the
reference through a copy of official_bench.sh with that override added), rows alternating;
a failed run is reported as such (and makes the exit status 1 once the JSON is written). The
last line per modality compares the best *correct* mode of each: the fastest run whose EMA
teacher computes in fp32. The official code's bf16 teacher computes in bf16 (``ema_same_dtype: true``,
its default: the EMA model is cast to the student's dtype, fp32 copies kept for the update);
d2v_plugin's teacher computes in fp32.
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
from datetime import datetime

from pretrain import cpu_name  # bench/ is on sys.path when this file runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_REF = os.path.join(ROOT, "..", "shared", "reference")
COMMON = ["common.fp16=false", "common.cpu=true", "common.tensorboard_logdir=null",
          "common.seed=1", "dataset.num_workers=0", "distributed_training.distributed_world_size=1",
          "checkpoint.no_save=true", "model.depth=4", "model.embed_dim=256", "model.num_heads=4",
          "model.clone_batch=8", "model.average_top_k_layers=4", "lr_scheduler.warmup_updates=5"]


def d2v_overrides(modality: str, work: str) -> list:
    """The settings official_bench.sh gives the reference, in d2v_plugin's config names."""
    if modality == "audio":
        return [f"task.data={work}/audio", "task.max_sample_size=48000", "task.min_sample_size=8000",
                "dataset.max_tokens=160000", "model.audio_decoder_dim=128"]
    if modality == "text":
        return [f"task.data={work}/text", "task.tokens_per_sample=128", "dataset.batch_size=8",
                "optimization.clip_norm=1", "model.text_decoder_dim=256"]
    return [f"task.data={work}/image_d2v", "task.input_size=32", "dataset.batch_size=16", "model.image_input_size=32",
            "model.image_patch_size=4", "model.image_prenet_depth=1", "model.image_decoder_dim=128",
            "model.image_decoder_layers=3"]


TIME = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []  # peak RSS; absent on some GPU images


def common(a, precision: str) -> list:
    """COMMON for ``--device`` and ``precision``: common.cpu=false on a GPU, common.fp16=true for
    fp16 (one value per key on Hydra's command line), common.bf16=true added for bf16."""
    swap = {"common.cpu=true": f"common.cpu={str(a.device == 'cpu').lower()}",
            "common.fp16=false": f"common.fp16={str(precision == 'fp16').lower()}"}
    return [swap.get(x, x) for x in COMMON] + (["common.bf16=true"] if precision == "bf16" else [])


def parse_log(path: str) -> dict:
    """Median seconds per update between fairseq train_inner lines (first interval dropped), peak RSS."""
    text = open(path, errors="replace").read()
    rows = re.findall(r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+).{0,40}train_inner.*?"num_updates": "(\d+)"', text)
    ts = [(datetime.strptime(a, "%Y-%m-%d %H:%M:%S,%f"), int(b)) for a, b in rows]
    per = [(ts[i][0] - ts[i - 1][0]).total_seconds() / (ts[i][1] - ts[i - 1][1]) for i in range(2, len(ts))]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not per or (TIME and not rss):
        raise RuntimeError(f"{path}: no timed intervals or no peak RSS; see the log")
    out = {"sec_per_update": statistics.median(per), "intervals": per,
           "peak_rss_mib": int(rss.group(1)) / 1024 if rss else float("nan")}
    free = [float(x) for x in re.findall(r"gb_free[=\s\":]+([\d.]+)", text)]  # fairseq logs it on a GPU
    if free:
        out["min_gb_free"] = min(free)
    cast = re.search(r"adjusting ema dtype to torch\.(\w+)", text)  # the official model casts its teacher (ema_same_dtype)
    if cast:
        out["teacher_dtype"] = cast.group(1)
    return out


def reference_script(a, precision: str) -> str:
    """official_bench.sh, or a copy of it in ``--work`` with the precision's overrides
    (``common.bf16=true`` / ``common.fp16=true``; the script itself fixes fp32), ``--log-interval``,
    ``common.cpu=false`` for ``--device cuda`` and no ``/usr/bin/time`` where there is none."""
    script = os.path.join(a.ref_scripts, "official_bench.sh")
    if precision == "fp32" and a.log_interval == 5 and a.device == "cpu" and TIME:
        return script
    text = open(script).read()
    if "common.fp16=false" not in text or "common.log_interval=5" not in text:
        sys.exit(f"{script}: no common.fp16=false / common.log_interval=5 to edit; update vs_reference.py")
    copy = os.path.join(a.work, f"official_bench_{precision}_log{a.log_interval}_{a.device}.sh")
    mixed = {"bf16": "common.fp16=false common.bf16=true", "fp16": "common.fp16=true"}.get(precision, "common.fp16=false")
    if a.device == "cuda":
        text = text.replace("common.cpu=true", "common.cpu=false", 1)
    if not TIME:
        text = text.replace('/usr/bin/time -v "$REF', '"$REF', 1)
    with open(copy, "w") as f:
        f.write(text.replace("common.fp16=false", mixed, 1)
                .replace("common.log_interval=5", f"common.log_interval={a.log_interval}", 1)
                .replace('"$(dirname "$0")/parse_fairseq_log.py"', f'"{os.path.dirname(os.path.abspath(script))}/parse_fairseq_log.py"'))
    return copy


def run_reference(a, modality: str, precision: str = "fp32") -> dict:
    script = reference_script(a, precision)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    subprocess.run(["bash", script, a.ref, a.work, modality, str(a.updates)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return parse_log(os.path.join(a.work, f"official_{modality}.log"))


def image_lists(a) -> None:
    """d2v_plugin's image lists for the reference's image folder (train/, val/)."""
    dest = os.path.join(a.work, "image_d2v")
    if os.path.isfile(os.path.join(dest, "train.tsv")):
        return
    src = os.path.join(a.work, "image_src")
    os.makedirs(src, exist_ok=True)
    for ours, theirs in (("train", "train"), ("valid", "val")):
        if not os.path.exists(os.path.join(src, ours)):
            os.symlink(os.path.join(a.work, "image", theirs), os.path.join(src, ours))
    subprocess.run([a.python, "-m", "d2v_plugin.prep.image_folder", src, "--dest", dest], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def run_d2v(a, modality: str, name: str, root: str, precision: str = "fp32") -> dict:
    """d2v_plugin from the checkout ``root`` (a ``--variants`` entry)."""
    if modality == "image":
        image_lists(a)
    exe = os.path.join(os.path.dirname(a.python), "fairseq-hydra-train")
    log = os.path.join(a.work, f"d2v_{name}_{modality}.log")
    cmd = TIME + [exe, "--config-dir", os.path.join(root, "config", "pretrain", modality),
           "--config-name", "base_v2", f"common.user_dir={os.path.join(root, 'd2v_plugin')}",
           f"optimization.max_update={a.updates}", f"checkpoint.save_dir={a.work}/ckpt_d2v_{modality}",
           f"hydra.run.dir={a.work}/hydra_d2v_{modality}", f"common.log_interval={a.log_interval}"] + common(a, precision) + \
        d2v_overrides(modality, a.work)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=root)
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=root)
    if res.returncode:
        sys.exit(f"d2v_plugin {modality} failed (exit {res.returncode}); see {log}")
    return parse_log(log)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="directory built by setup_reference.sh (venv/, root/)")
    ap.add_argument("--work", required=True, help="scratch directory for data, logs and checkpoints")
    ap.add_argument("--ref-scripts", default=SHARED_REF, help="folder with official_bench.sh")
    ap.add_argument("--python", default=None, help="python that runs d2v_plugin (default: the reference venv's)")
    ap.add_argument("--modalities", default="audio,text,image", help="comma-separated modalities")
    ap.add_argument("--rounds", type=int, default=3, help="alternating reference / d2v_plugin runs per modality")
    ap.add_argument("--updates", type=int, default=30, help="updates per run")
    ap.add_argument("--log-interval", type=int, default=5,
                    help="updates between fairseq's log lines, both implementations (the intervals timed; the first dropped)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both")
    ap.add_argument("--variants", default=f"d2v_plugin={ROOT}",
                    help="comma-separated NAME=CHECKOUT d2v_plugin trees to time beside the reference (e.g. "
                         "before=/tmp/old,after=. for an optimisation's before/after row); the first is the headline")
    ap.add_argument("--precision", default="fp32",
                    help="comma-separated: fp32, bf16 (fairseq's common.bf16=true, both), fp16 (GPU: common.fp16=true)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: both with common.cpu=false (the GPU check, bench/gpu_check.sh)")
    ap.add_argument("--out", default="data/bench/vs_reference.json", help="JSON output path")
    a = ap.parse_args()
    a.ref, a.work = os.path.abspath(a.ref), os.path.abspath(a.work)
    os.makedirs(a.work, exist_ok=True)
    a.python = a.python or os.path.join(a.ref, "venv", "bin", "python")
    if a.python.startswith(a.ref) and subprocess.run([a.python, "-c", "import editdistance"],
                                                     capture_output=True).returncode:
        # the reference venv runs d2v_plugin too: add its one missing dependency
        subprocess.run([a.python, "-m", "pip", "install", "-q", "editdistance"], check=True, stdout=subprocess.DEVNULL)
    text_data = os.path.isfile(os.path.join(a.work, "text", "dict.txt"))
    if "text" in a.modalities.split(",") and not text_data and shutil.which("bible") is None:
        sys.exit("vs_reference.py: official_bench.sh builds its text data from the King James Bible of the "
                 "'bible' command: install Debian's bible-kjv (apt-get install bible-kjv), or drop text from --modalities")
    variants = [(v.split("=", 1)[0], os.path.abspath(v.split("=", 1)[1])) for v in a.variants.split(",")]
    precisions = a.precision.split(",")
    rows = [("reference", p) for p in precisions] + [(name, p) for name, _ in variants for p in precisions]
    roots = dict(variants)
    results = {}
    for r in range(a.rounds):
        for mod in a.modalities.split(","):
            run = {}
            for who, prec in (rows if r % 2 == 0 else rows[::-1]):  # alternate the order between rounds
                try:
                    run[f"{who} {prec}"] = (run_reference(a, mod, prec) if who == "reference"
                                            else run_d2v(a, mod, who, roots[who], prec))
                except (subprocess.CalledProcessError, RuntimeError, SystemExit) as e:
                    run[f"{who} {prec}"] = {"error": str(e)[-300:]}
            results.setdefault(mod, []).append(run)
            for k, v in run.items():
                if v.get("teacher_dtype", "float32") != "float32":
                    print(f"round {r + 1} {mod}: {k}: the teacher was cast to {v['teacher_dtype']} (its log: "
                          f"'adjusting ema dtype'): its targets are not fp32", file=sys.stderr)
            print(f"round {r + 1} {mod}: " + ", ".join(
                f"{k} {v['sec_per_update']:.3f} s/update" if "error" not in v else f"{k} FAILED" for k, v in run.items()),
                file=sys.stderr)
    torch_version = subprocess.run([a.python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                   text=True).stdout.strip()
    cpu = cpu_name()
    print(f"CPU: {cpu}, OMP_NUM_THREADS={a.threads}, torch {torch_version}; {a.updates} updates per run "
          f"(logged every {a.log_interval}), "
          f"{a.rounds} rounds; medians (speedup = reference s/update / d2v_plugin s/update in the same precision, "
          "per round, then median)")
    print(f"{'modality':<8} {'variant':<12} {'prec':<5} {'s/update':>9} {'speedup':>8} {'per round':>18} {'peak MiB':>9}")
    summary = {}
    for mod, runs in results.items():
        summary[mod] = {}
        for who, prec in rows:
            key = f"{who} {prec}"
            ok = [x[key] for x in runs if "error" not in x[key]]
            if not ok:
                summary[mod][key] = {"error": runs[0][key]["error"]}
                print(f"{mod:<8} {who:<12} {prec:<5} {'failed: ' + runs[0][key]['error'].splitlines()[-1][:60]:>40}")
                continue
            s = summary[mod][key] = dict(sec_per_update=statistics.median(x["sec_per_update"] for x in ok),
                                         peak_rss_mib=statistics.median(x["peak_rss_mib"] for x in ok),
                                         teacher_dtype=ok[0].get("teacher_dtype", "float32"))
            ref = f"reference {prec}"
            ratios = [x[ref]["sec_per_update"] / x[key]["sec_per_update"] for x in runs
                      if who != "reference" and "error" not in x[key] and "error" not in x[ref]]
            if ratios:
                s.update(speedup=statistics.median(ratios), speedups=ratios)
            speedup = f"{s['speedup']:.2f}x" if ratios else "1.00x" if who == "reference" else ""
            print(f"{mod:<8} {who:<12} {prec:<5} {s['sec_per_update']:>9.3f} {speedup:>8} "
                  f"{' '.join(f'{x:.2f}' for x in ratios):>18} {s['peak_rss_mib']:>9.0f}")
        # a mode is correct when its teacher (targets, EMA) computes in fp32; the official bf16 is not
        best = lambda who: min(((v["sec_per_update"], k) for k, v in summary[mod].items()  # noqa: E731
                                if k.startswith(who + " ") and "error" not in v and v["teacher_dtype"] == "float32"),
                               default=None)
        headline = variants[0][0]
        mine, theirs = best(headline), best("reference")
        if mine is None or theirs is None:
            print(f"{mod:<8} best correct modes: none to compare (no correct run of one implementation)")
            continue
        per_round = [x[theirs[1]]["sec_per_update"] / x[mine[1]]["sec_per_update"] for x in runs
                     if "error" not in x[theirs[1]] and "error" not in x[mine[1]]]
        summary[mod]["best"] = {"d2v_plugin": mine[1], "reference": theirs[1], "speedup": statistics.median(per_round),
                                "speedups": per_round, "peak_rss_mib": [summary[mod][mine[1]]["peak_rss_mib"],
                                                                        summary[mod][theirs[1]]["peak_rss_mib"]]}
        print(f"{mod:<8} best correct modes (teacher fp32): {mine[1]} {mine[0]:.3f} vs {theirs[1]} {theirs[0]:.3f} "
              f"s/update: {statistics.median(per_round):.2f}x (per round {' '.join(f'{x:.2f}' for x in per_round)}); "
              f"peak {summary[mod][mine[1]]['peak_rss_mib']:.0f} vs {summary[mod][theirs[1]]['peak_rss_mib']:.0f} MiB")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"cpu": cpu, "threads": a.threads, "torch": torch_version, "updates": a.updates,
                   "log_interval": a.log_interval, "command": " ".join(sys.argv),
                   "variants": dict(variants), "summary": summary, "runs": results}, f, indent=1)
    print(f"wrote {a.out}")
    failed = sorted({f"{mod}: {k}" for mod, runs in results.items() for run in runs for k, v in run.items() if "error" in v})
    if failed:  # written, but not a complete comparison
        sys.exit(f"vs_reference.py: {len(failed)} run(s) failed ({'; '.join(failed)}); their logs are in {a.work}")


if __name__ == "__main__":
    main()
