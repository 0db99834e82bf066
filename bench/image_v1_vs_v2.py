"""Time to quality: data2vec 1.0 vs 2.0 image pretraining at equal wall-clock budgets, in one process
(bench/time_to_quality.py compares methods through the fairseq binaries).

    python bench/image_v1_vs_v2.py [--budget 300] [--snapshots 6] [--work data/bench/ttq]

Both algorithms pretrain the shipped tiny image models (config/pretrain/image/tiny_v1.yaml
and tiny_v2.yaml: 4 blocks of 128, 32x32 Fashion-MNIST, the YAML's batch, learning rate,
Adam betas, weight decay, clip norm; linear warm-up then constant) for ``--budget``
seconds of training each, on the same unlabelled images, through the real data pipeline
(d2v_plugin's ImageDataset with random resized crops, masks drawn in a data-loader worker).
The student is snapshotted at evenly spaced training times (the clock stops while it is
copied). Each snapshot is scored by a linear probe: mean-pooled last-layer features of the
frozen encoder, a logistic regression fitted by L-BFGS on ``--labelled`` labelled training
images, accuracy on the held-out valid split (Fashion-MNIST test images). Writes JSON and a
PNG of probe accuracy against training time; prints when v2 first reaches v1's final
probe accuracy.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from plot import line_chart  # noqa: E402
from pretrain import model_config  # noqa: E402

from d2v_plugin.probe import linear_probe  # noqa: E402


def make_images(work: str, n: int, labelled: int) -> str:
    images, lists = f"{work}/images", f"{work}/images/lists"
    if not os.path.isdir(f"{images}/train"):
        subprocess.run([sys.executable, "-m", "d2v_plugin.samples", "images", "--out", images, "--n", str(n), "--size", "32"],
                       check=True, cwd=ROOT)
    if not os.path.isfile(f"{lists}/labelled.tsv"):
        subprocess.run([sys.executable, "-m", "d2v_plugin.prep.image_folder", images, "--dest", lists, "--labelled",
                        str(labelled)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return lists


def yaml_training(algorithm: str) -> dict:
    from omegaconf import OmegaConf

    y = OmegaConf.load(os.path.join(ROOT, "config", "pretrain", "image", f"tiny_{algorithm}.yaml"))
    return dict(lr=float(y.optimization.lr[0]), betas=tuple(y.optimizer.adam_betas), eps=float(y.optimizer.adam_eps),
                weight_decay=float(y.optimizer.weight_decay), clip=float(y.optimization.clip_norm),
                warmup=int(y.lr_scheduler.warmup_updates), batch=int(y.dataset.batch_size),
                min_crop_scale=float(y.task.min_crop_scale))


def pretrain(algorithm: str, lists: str, budget: float, snapshots: int, seed: int):
    """-> [(training seconds, updates, student state_dict)] at 0, budget/snapshots, ..., budget."""
    from d2v_plugin.data.image import ImageDataset
    from d2v_plugin.models.d2v_multi import D2vMultiModel

    torch.manual_seed(seed)
    hp = yaml_training(algorithm)
    cfg, _ = model_config("image", "tiny", algorithm, clone=None)
    model = D2vMultiModel(cfg).train()
    enc = model.modality_encoders["image"]
    ds = ImageDataset(f"{lists}/train.tsv", cfg.image_input_size, train=True, seed=seed, min_crop_scale=hp["min_crop_scale"])
    ds.set_masking(enc.masking)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])

    def student_state():  # student and teacher (the "_ema" entry), copied
        return copy.deepcopy(model.state_dict())

    snaps = [(0.0, 0, student_state())]
    elapsed, updates, epoch = 0.0, 0, 1
    next_snap = budget / snapshots
    while elapsed < budget:
        ds.set_epoch(epoch)
        order = ds.ordered_indices()
        batches = [order[i:i + hp["batch"]] for i in range(0, len(order) - hp["batch"] + 1, hp["batch"])]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=ds.collater, num_workers=1,
                                             persistent_workers=False)
        start = time.perf_counter()
        for batch in loader:
            for g in opt.param_groups:
                g["lr"] = hp["lr"] * min(1.0, (updates + 1) / hp["warmup"])
            model.set_num_updates(updates)
            out = model(**batch["net_input"], modality="image")
            loss = sum(out["losses"].values()) / out["sample_size"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp["clip"])
            opt.step()
            updates += 1
            model.ema_step(updates)
            now = time.perf_counter()
            if elapsed + now - start >= next_snap or elapsed + now - start >= budget:
                elapsed += now - start
                snaps.append((elapsed, updates, student_state()))  # off the clock
                print(f"  {algorithm}: {elapsed:.0f} s, {updates} updates, loss {float(loss.detach()):.3f}", file=sys.stderr)
                next_snap += budget / snapshots
                if elapsed >= budget:
                    break
                start = time.perf_counter()
        else:
            elapsed += time.perf_counter() - start
        del loader
        epoch += 1
    return cfg, snaps


@torch.no_grad()
def features(model, ds, batch: int = 256):
    model.eval()
    xs, ys = [], []
    for i in range(0, len(ds), batch):
        items = [ds[j] for j in range(i, min(i + batch, len(ds)))]
        b = ds.collater(items)
        x = model.extract_features(b["net_input"]["source"], modality="image")["x"]  # (B, L, D)
        xs.append(x.mean(1))
        ys.append(b["target"])
    return torch.cat(xs), torch.cat(ys)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="data/bench/ttq", help="folder for the sample images")
    ap.add_argument("--budget", type=float, default=300, help="training seconds per algorithm")
    ap.add_argument("--snapshots", type=int, default=6, help="probed snapshots per run (plus the initial model)")
    ap.add_argument("--n", type=int, default=5000, help="unlabelled training images (valid gets n // 5)")
    ap.add_argument("--labelled", type=int, default=2000, help="labelled training images for the probe")
    ap.add_argument("--seed", type=int, default=1, help="seed of initialisation, crops and masks")
    ap.add_argument("--out", default="data/bench/image_v1_vs_v2.json", help="JSON output")
    ap.add_argument("--png", default="data/bench/image_v1_vs_v2.png", help="plot output")
    a = ap.parse_args()
    from d2v_plugin.data.image import ImageDataset
    from d2v_plugin.models.d2v_multi import D2vMultiModel

    lists = make_images(os.path.abspath(a.work), a.n, a.labelled)
    labels = [ln.strip() for ln in open(f"{lists}/labels.txt") if ln.strip()]
    probe_train = ImageDataset(f"{lists}/labelled.tsv", 32, train=False, labels=labels)
    probe_test = ImageDataset(f"{lists}/valid.tsv", 32, train=False, labels=labels)
    results = {}
    for algorithm in ("v1", "v2"):
        cfg, snaps = pretrain(algorithm, lists, a.budget, a.snapshots, a.seed)
        model = D2vMultiModel(cfg)
        rows = []
        for seconds, updates, state in snaps:
            model.load_state_dict(state, strict=False)
            acc = linear_probe(*features(model, probe_train), *features(model, probe_test))
            rows.append({"seconds": seconds, "updates": updates, "probe_acc": acc})
            print(f"{algorithm}: {seconds:7.1f} s {updates:6d} updates  probe {acc:.2f}%", file=sys.stderr)
        results[algorithm] = rows
    v1_final = results["v1"][-1]["probe_acc"]
    reach = next((r for r in results["v2"] if r["probe_acc"] >= v1_final), None)
    print(f"{'algo':<4} {'seconds':>8} {'updates':>8} {'probe %':>8}")
    for algorithm, rows in results.items():
        for r in rows:
            print(f"{algorithm:<4} {r['seconds']:>8.1f} {r['updates']:>8d} {r['probe_acc']:>8.2f}")
    if reach:
        line = (f"v2 reaches v1's final probe accuracy ({v1_final:.2f}% after {results['v1'][-1]['seconds']:.0f} s) "
                f"after {reach['seconds']:.0f} s ({100 * reach['seconds'] / results['v1'][-1]['seconds']:.0f}% of v1's time)")
    else:
        line = f"v2 does not reach v1's final probe accuracy ({v1_final:.2f}%) within the budget"
    print(line)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    line_chart({f"data2vec {k[1]}.0 ({k})": [(r["seconds"], r["probe_acc"]) for r in v] for k, v in results.items()},
               a.png, "Linear probe accuracy vs pretraining time (tiny image models, Fashion-MNIST, 2 CPU cores)",
               "training seconds", "probe accuracy %", hline=(v1_final, "v1 final"))
    with open(a.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "budget_s": a.budget, "results": results, "summary": line}, f, indent=1)
    print(f"wrote {a.out} and {a.png}")


if __name__ == "__main__":
    main()
