"""Feature extraction, files in and features out: d2v_plugin against transformers on the same
exported weights, same threads, fp32 and bf16.

    python bench/extract.py [--sizes small] [--files 24] [--rounds 3] [--passes 2]
                            [--batch-size 8] [--out data/bench/extract.json]

Inputs: a folder of ``--files`` mixed-length speech files (1-6 s, 16 kHz, seeded
tones plus noise) and one of as many 224 x 224 PNG images. Models: the shipped
YAMLs (``small`` = the tiny YAML at depth 6, width 256, as ``bench/pretrain.py``) with random
weights, written as a pretraining checkpoint and exported with ``python -m
d2v_plugin.export --to hf``: data2vec 1.0 speech (``Data2VecAudioModel``) and data2vec 2.0
images (no transformers class computes the plugin's image encoder, so that row is the
plugin's alone).

One pass = read every file, normalise, batch (``--batch-size``, padded to the longest),
forward, remove the padding, float32 numpy per file. d2v_plugin's ``extract`` batches files
of similar length together (``Extractor.batches``: 32 batches read at a time, sorted by
length); the row "d2v_plugin (input order)" batches in the given order, as the
transformers loop does, so the table shows what the model and what the batching are worth. Each
(implementation, precision) runs in its own process (peak RSS above the process's baseline
after its imports is its memory); processes alternate over ``--rounds`` rounds and the
table reports the median pass over all rounds, and the ratio of medians. The features of
both implementations are compared on every file (max abs difference).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def make_inputs(work: str, n: int) -> dict:
    import numpy as np
    import soundfile as sf
    from PIL import Image

    rng = np.random.RandomState(0)
    audio, images = os.path.join(work, "wav"), os.path.join(work, "img")
    os.makedirs(audio, exist_ok=True)
    os.makedirs(images, exist_ok=True)
    for i in range(n):
        t = np.arange(int(16000 * rng.uniform(1.0, 6.0))) / 16000
        wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.randn(len(t))
        sf.write(os.path.join(audio, f"{i:03d}.wav"), wav.astype("float32"), 16000)
        Image.fromarray(rng.randint(0, 256, (224, 224, 3), dtype=np.uint8)).save(os.path.join(images, f"{i:03d}.png"))
    return {"audio": sorted(os.path.join(audio, f) for f in os.listdir(audio)),
            "image": sorted(os.path.join(images, f) for f in os.listdir(images))}


def make_checkpoint(modality: str, size: str, algorithm: str, path: str) -> None:
    import dataclasses

    import torch
    from pretrain import model_config

    from d2v_plugin.models.settings import model_settings
    from d2v_plugin.modules.data2vec import Data2Vec

    cfg, _ = model_config(modality, size, algorithm, None)
    # the reference's (and transformers') padding: padded frames zeroed before the positional conv
    # only, so a padded batch gives both implementations the same features (the plugin's default
    # also zeroes them between its layers: a padded row then equals the row alone)
    cfg.padding_aware = False
    torch.manual_seed(0)
    model = Data2Vec(model_settings(cfg))
    d = {k: getattr(v, "value", v) for k, v in dataclasses.asdict(cfg).items()}
    d["_name"] = "d2v_multi"
    task = {"_name": f"d2v_{modality}_pretraining", "normalize": True, "sample_rate": 16000}
    torch.save({"cfg": {"model": d, "task": task}, "model": model.state_dict(), "args": None, "extra_state": {},
                "optimizer_history": [{"criterion_name": "d2v", "optimizer_name": "adam", "lr_scheduler_state": {},
                                       "num_updates": 0}]}, path)


NAMES = {"plugin": "d2v_plugin", "plugin_inorder": "d2v_plugin (input order)", "hf": "transformers"}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plugin(ckpt: str, files, dtype, batch_size: int, sort: bool = True):
    import d2v_plugin

    ex = d2v_plugin.load(ckpt).to(dtype)
    return lambda: ex.extract(files, batch_size=batch_size, sort=sort)


def run_hf(folder: str, files, dtype, batch_size: int):
    import soundfile as sf
    import torch
    from transformers import AutoFeatureExtractor, AutoModel

    fe = AutoFeatureExtractor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval().to(dtype)

    @torch.no_grad()
    def one_pass():
        out = []
        for start in range(0, len(files), batch_size):
            wavs = [sf.read(f, dtype="float32")[0] for f in files[start : start + batch_size]]
            inp = fe(wavs, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
            h = model(inp["input_values"].to(dtype), attention_mask=inp["attention_mask"]).last_hidden_state
            lengths = model._get_feat_extract_output_lengths(inp["attention_mask"].sum(-1))
            out += [h[b, : int(n)].float().numpy() for b, n in enumerate(lengths)]
        return out

    return one_pass


def one(impl: str, modality: str, model_path: str, files, precision: str, batch_size: int, passes: int,
        threads: int, save: str) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if impl == "hf":
        import transformers  # noqa: F401  (its import, like fairseq's for the plugin, is not the model's memory)
    import d2v_plugin  # noqa: F401
    base = rss_mib()
    if impl == "hf":
        fn = run_hf(model_path, files, dtype, batch_size)
    else:
        fn = run_plugin(model_path, files, dtype, batch_size, sort=impl == "plugin")
    feats = fn()  # warm-up pass
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    np.savez(save, *feats)
    return {"impl": impl, "modality": modality, "precision": precision, "pass_s": times, "files": len(files),
            "peak_mib": rss_mib() - base, "threads": threads}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small", help="comma-separated: tiny, small, base")
    ap.add_argument("--files", type=int, default=24, help="files per modality")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (one process per implementation each)")
    ap.add_argument("--passes", type=int, default=2, help="timed passes per process, after one warm-up pass")
    ap.add_argument("--batch-size", type=int, default=8, help="files per forward pass")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for both")
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--work", default=None, help="folder for inputs and models (default: a temporary one)")
    ap.add_argument("--out", default="data/bench/extract.json", help="JSON output path")
    ap.add_argument("--one", nargs=5, metavar=("IMPL", "MOD", "MODEL", "PREC", "SAVE"), help=argparse.SUPPRESS)
    ap.add_argument("--list", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        impl, mod, path, prec, save = a.one
        files = open(a.list).read().split("\n")
        print(json.dumps(one(impl, mod, path, files, prec, a.batch_size, a.passes, a.threads, save)))
        return
    import numpy as np

    work = a.work or tempfile.mkdtemp(prefix="d2v_bench_extract_")
    inputs = make_inputs(work, a.files)
    rows, checks = [], []
    for size in a.sizes.split(","):
        jobs = []
        for mod, algo in (("audio", "v1"), ("image", "v2")):
            ckpt = os.path.join(work, f"{mod}_{size}_{algo}.pt")
            make_checkpoint(mod, size, algo, ckpt)
            lst = os.path.join(work, f"{mod}.list")
            open(lst, "w").write("\n".join(inputs[mod]))
            impls = [("plugin", ckpt)]
            if mod == "audio":
                impls.append(("plugin_inorder", ckpt))
                hf = os.path.join(work, f"hf_{mod}_{size}")
                subprocess.run([sys.executable, "-m", "d2v_plugin.export", ckpt, "--to", "hf", "--out", hf], check=True,
                               cwd=ROOT, capture_output=True)
                impls.append(("hf", hf))
            for prec in a.precision.split(","):
                jobs.append([(impl, mod, path, prec, lst) for impl, path in impls])
        runs = {}
        for r in range(a.rounds):
            for group in jobs:
                for impl, mod, path, prec, lst in (group if r % 2 == 0 else group[::-1]):  # alternate the order too
                    save = os.path.join(work, f"feats_{impl}_{mod}_{size}_{prec}.npz")
                    cmd = [sys.executable, os.path.abspath(__file__), "--one", impl, mod, path, prec, save, "--list", lst,
                           "--batch-size", str(a.batch_size), "--passes", str(a.passes), "--threads", str(a.threads)]
                    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                    if res.returncode:
                        sys.exit(f"{impl} {mod} {prec} failed:\n{res.stderr[-3000:]}")
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                    key = (impl, mod, size, prec)
                    runs.setdefault(key, {"times": [], "peak": []})
                    runs[key]["times"] += row["pass_s"]
                    runs[key]["peak"].append(row["peak_mib"])
                    print(f"  round {r + 1}: {impl} {mod} {size} {prec}: {statistics.median(row['pass_s']):.2f} s/pass",
                          file=sys.stderr)
        for (impl, mod, sz, prec), v in runs.items():
            med = statistics.median(v["times"])
            rows.append({"impl": impl, "modality": mod, "size": sz, "precision": prec, "median_pass_s": med,
                         "files_per_s": a.files / med, "peak_mib": statistics.median(v["peak"]), "passes": len(v["times"])})
        for prec in a.precision.split(","):
            h = np.load(os.path.join(work, f"feats_hf_audio_{size}_{prec}.npz"))
            for impl in ("plugin_inorder", "plugin"):
                p = np.load(os.path.join(work, f"feats_{impl}_audio_{size}_{prec}.npz"))
                diff = max(float(np.abs(p[k] - h[k]).max()) for k in p.files)
                checks.append({"impl": impl, "size": size, "precision": prec, "max_abs_diff": diff,
                               "shapes_equal": all(p[k].shape == h[k].shape for k in p.files)})
    from pretrain import device_name

    print(f"device: {device_name('cpu')}; {a.threads} threads; {a.files} files per modality, batch {a.batch_size}; "
          f"median of {a.rounds} x {a.passes} passes")
    head = f"{'modality':<8} {'size':<5} {'prec':<5} {'impl':<24} {'s/pass':>7} {'files/s':>8} {'peak MiB':>9} {'vs hf':>6}"
    print(head + "\n" + "-" * len(head))
    by = {(r["impl"], r["modality"], r["size"], r["precision"]): r for r in rows}
    for r in rows:
        hf = by.get(("hf", r["modality"], r["size"], r["precision"]))
        mine = r["impl"] != "hf"
        ratio = f"{hf['median_pass_s'] / r['median_pass_s']:.2f}x" if hf and mine else ""
        name = NAMES[r["impl"]]
        print(f"{r['modality']:<8} {r['size']:<5} {r['precision']:<5} {name:<24} {r['median_pass_s']:>7.2f} "
              f"{r['files_per_s']:>8.1f} {r['peak_mib']:>9.0f} {ratio:>6}")
        if hf and mine:
            r["speedup_vs_hf"] = hf["median_pass_s"] / r["median_pass_s"]
    for c in checks:
        print(f"audio {c['size']} {c['precision']}: features of {NAMES[c['impl']]} vs transformers, max abs diff "
              f"{c['max_abs_diff']:.2e} (shapes equal: {c['shapes_equal']})")
    print("(same batches -> the same features. Batched by length, rows differ near their ends: with padding_aware=false, "
          "what transformers computes, the multi-layer positional conv reads the padded frames, so a row's features "
          "depend on the rows it is batched with; the plugin's default padding_aware=true makes them batch-independent)")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"device": device_name("cpu"), "threads": a.threads, "files": a.files, "batch_size": a.batch_size,
                   "command": " ".join(sys.argv), "rows": rows, "feature_checks": checks}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
