"""Image split lists (and the label dictionary) for the d2v image tasks.

    python -m d2v_plugin.prep.image_folder IMAGE_ROOT --dest DATA [--labelled N]

IMAGE_ROOT holds one folder per split (``train/``, ``valid/``, optionally ``test/``),
each with images either flat (unlabelled) or in class sub-folders (folder name =
label). Every image is decoded with Pillow; usable ones go to DATA/{split}.tsv (first
line the split folder, then ``relative/path<TAB>label``), unreadable or truncated ones
are listed with the reason on stderr and in DATA/rejected.tsv. DATA/labels.txt lists
the training classes (one per line, index = class id); a class in another split but
not in train is an error. ``--labelled N`` also writes DATA/labelled.tsv: N training
images, class-balanced, for fine-tuning on a small labelled subset.
"""
from __future__ import annotations

import argparse
import os
import random
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from . import write_rejected

EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff")


def check_image(path: str) -> str:
    """"" for a decodable image, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                return "empty image"
    except Exception as e:  # Pillow raises several types
        return f"cannot decode: {str(e).splitlines()[0]}"
    return ""


def scan_split(folder: str) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """-> ([(relative path, label)], [(path, reason)]); label = first-level sub-folder or ""."""
    good, rejected = [], []
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.rsplit(".", 1)[-1].lower() not in EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            reason = check_image(path)
            if reason:
                rejected.append((path, reason))
            else:
                good.append((rel, rel.split(os.sep)[0] if os.sep in rel else ""))
    return good, rejected


def write_lists(root: str, dest: str, labelled: Optional[int] = None, seed: int = 42) -> Dict[str, int]:
    root = os.path.realpath(root)
    splits = [s for s in ("train", "valid", "test") if os.path.isdir(os.path.join(root, s))]
    if "train" not in splits:
        raise SystemExit(f"error: {root} has no train/ folder (expected train/ and valid/, flat or with class sub-folders)")
    os.makedirs(dest, exist_ok=True)
    counts, rejected_all, found = {}, [], {}
    for split in splits:
        good, rejected = scan_split(os.path.join(root, split))
        if not good:
            raise SystemExit(f"error: no usable image under {os.path.join(root, split)} ({len(rejected)} rejected)")
        found[split] = good
        rejected_all += rejected
    classes = sorted({lab for _, lab in found["train"] if lab})
    if classes and any(not lab for _, lab in found["train"]):
        raise SystemExit(f"error: {root}/train mixes images in class folders with images directly in train/")
    for split, good in found.items():
        unknown = sorted({lab for _, lab in good if lab and lab not in classes})
        if unknown:
            raise SystemExit(f"error: {root}/{split} has classes not in train: {unknown}")
        with open(os.path.join(dest, f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write(os.path.join(root, split) + "\n" + "".join(f"{rel}\t{lab}\n" for rel, lab in good))
        counts[split] = len(good)
    with open(os.path.join(dest, "labels.txt"), "w", encoding="utf-8") as f:
        f.write("".join(c + "\n" for c in classes))
    if labelled:
        by_class = defaultdict(list)
        for item in found["train"]:
            by_class[item[1]].append(item)
        rng, picked = random.Random(seed), []
        per_class = max(1, labelled // max(1, len(by_class)))
        for lab in sorted(by_class):
            picked += rng.sample(by_class[lab], min(per_class, len(by_class[lab])))
        with open(os.path.join(dest, "labelled.tsv"), "w", encoding="utf-8") as f:
            f.write(os.path.join(root, "train") + "\n" + "".join(f"{rel}\t{lab}\n" for rel, lab in sorted(picked)))
        counts["labelled"] = len(picked)
    write_rejected(dest, rejected_all)
    return counts | {"classes": len(classes), "rejected": len(rejected_all)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="folder with train/ and valid/ (and optionally test/)")
    ap.add_argument("--dest", required=True, help="output folder for {split}.tsv, labels.txt, rejected.tsv")
    ap.add_argument("--labelled", type=int, help="also write labelled.tsv with this many class-balanced train images")
    ap.add_argument("--seed", type=int, default=42, help="seed of the labelled subset")
    a = ap.parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in write_lists(a.root, a.dest, a.labelled, a.seed).items()))


if __name__ == "__main__":
    main()
