"""The image part of `make demo`: data2vec 2.0 image pretraining and classification, with fairseq's binaries.

1. writes Fashion-MNIST images (Debian package dataset-fashion-mnist) as PNG class folders
   and validated split lists (train from the training set, valid from the test set);
2. pretrains config/pretrain/image/tiny_v2.yaml with `fairseq-hydra-train` on the
   unlabelled training images;
3. fine-tunes config/finetune/image/tiny.yaml on a small class-balanced labelled subset,
   from the pretrained checkpoint and from random initialisation (same budget);
4. scores the held-out valid split with `fairseq-validate` and prints top-1 / top-5.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_common import PRETRAINED, PY, compare, curve_text, fairseq_validate, finetune_runs, loss_fell, pretrain, sh  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="data/demo", help="working folder (images, checkpoints, logs)")
    ap.add_argument("--n", type=int, default=5000, help="training images (unlabelled for pretraining); valid gets n // 5")
    ap.add_argument("--labelled", type=int, default=1000, help="labelled training images for fine-tuning")
    ap.add_argument("--updates", type=int, default=600, help="pretraining updates (batch 64)")
    ap.add_argument("--ft-updates", type=int, default=300, help="fine-tuning updates per run (batch 64)")
    ap.add_argument("--seed", type=int, default=1, help="seed of training")
    a = ap.parse_args()
    work = os.path.abspath(a.work)
    images, lists = f"{work}/images", f"{work}/images/lists"
    if not os.path.isdir(f"{images}/train"):
        sh([PY, "-m", "d2v_plugin.samples", "images", "--out", images, "--n", str(a.n), "--size", "32"])
    sh([PY, "-m", "d2v_plugin.prep.image_folder", images, "--dest", lists, "--labelled", str(a.labelled)])
    count = lambda split: sum(1 for _ in open(f"{lists}/{split}.tsv")) - 1  # noqa: E731

    pretrained, pt_min, curve = pretrain(work, "image", "config/pretrain/image", lists, a.seed, a.updates)

    def evaluate(ckpt, log):
        m = fairseq_validate(lists, "d2v_image_classification", ckpt, "valid", 128, log)
        return {"valid_top1": m["top1"], "valid_top5": m["top5"], "images": int(m["nsentences"])}

    results = finetune_runs(work, "image", "config/finetune/image", lists, pretrained, a.seed, compare(a), evaluate,
                            "dataset.train_subset=labelled")

    print(f"\nd2v_plugin demo: data2vec 2.0 image pretraining + classification (Fashion-MNIST 32x32, {work}/images)")
    print(f"pretraining on {count('train')} unlabelled images: {a.updates} updates in {pt_min:.1f} min, "
          f"{curve_text(curve)}; fine-tuning on {count('labelled')} labelled images; "
          f"valid: {count('valid')} held-out images (the Fashion-MNIST test set)")
    print(f"\n{'model':<34} {'updates':>7} {'min':>5} {'valid top-1 %':>13} {'top-5 %':>8}")
    for name, r in results.items():
        print(f"{name:<34} {r['updates']:>7} {r['minutes']:>5} {r['valid_top1']:>13.2f} {r['valid_top5']:>8.2f}")
    with open(f"{work}/image_results.json", "w") as f:
        json.dump({"pretrain_updates": a.updates, "labelled": count("labelled"), "runs": results}, f, indent=1)
    print(f"results: {work}/image_results.json; logs in {work}/")
    if not (loss_fell(curve) and results[PRETRAINED]["valid_top1"] > 30.0):
        sys.exit("demo check failed: the pretraining loss must fall and the classifier must beat chance (10%) clearly")


if __name__ == "__main__":
    main()
