"""Sentence(-pair) classification data for ``d2v_text_classification``.

    python -m d2v_plugin.prep.text_classification --train TSV --valid TSV [--test TSV] \\
        --text-data DATA --dest CLS_DATA [--regression]

Rows are ``sentence<TAB>label`` or ``sentence1<TAB>sentence2<TAB>label``. Sentences are
encoded with the pretraining data's sentencepiece model (DATA/spm.model) and binarised
with its dictionary (DATA/dict.txt) into CLS_DATA/input0 (and input1 for pairs); labels
go to CLS_DATA/{split}.label, class names to CLS_DATA/labels.txt (classification) or
floats (``--regression``). Rows with the wrong number of columns, an empty sentence,
undecodable bytes or a label unseen in train are skipped and reported with their line
(stderr and CLS_DATA/skipped.tsv).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

Row = Tuple[List[str], str, int]  # sentences, label, line number


def read_rows(path: str) -> Tuple[List[Row], List[str]]:
    rows, skipped, width = [], [], None
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}, line {n}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                skipped.append(f"{where}\tundecodable bytes at offset {e.start}")
                continue
            if not line.strip():
                skipped.append(f"{where}\tempty line")
                continue
            cols = line.split("\t")
            width = width or len(cols)
            if len(cols) not in (2, 3) or len(cols) != width:
                skipped.append(f"{where}\t{len(cols)} columns, expected {width or '2 or 3'} (sentence[<TAB>sentence2]<TAB>label)")
                continue
            sentences = [" ".join(c.split()) for c in cols[:-1]]
            if not all(sentences):
                skipped.append(f"{where}\tempty sentence")
                continue
            rows.append((sentences, cols[-1].strip(), n))
    return rows, skipped


def binarise(bpe_prefix: Dict[str, str], dictionary: str, dest: str) -> None:
    binary = os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess")
    args = [binary, "--only-source", "--srcdict", dictionary, "--destdir", dest, "--workers", "1", "--dataset-impl", "mmap"]
    for split, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref")):
        if split in bpe_prefix:
            args += [flag, bpe_prefix[split]]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: fairseq-preprocess failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def prepare(splits: Dict[str, str], text_data: str, dest: str, regression: bool = False) -> Dict[str, int]:
    import sentencepiece as spm

    model, dictionary = os.path.join(text_data, "spm.model"), os.path.join(text_data, "dict.txt")
    for path in (model, dictionary):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found; prepare the pretraining text with d2v_plugin.prep.text first")
    sp = spm.SentencePieceProcessor(model_file=model)
    os.makedirs(dest, exist_ok=True)
    shutil.copy(model, os.path.join(dest, "spm.model"))
    shutil.copy(dictionary, os.path.join(dest, "dict.txt"))
    data, skipped = {}, []
    for split, path in splits.items():
        data[split], bad = read_rows(path)
        skipped += bad
    empty = [f"{splits[split]} ({split})" for split, rows in data.items() if not rows]
    if empty:
        raise SystemExit(f"error: no usable `sentence<TAB>label` row in {', '.join(empty)} ({len(skipped)} malformed "
                         "row(s) skipped); each line needs a sentence (or two) and a label, tab-separated")
    classes: Optional[List[str]] = None if regression else sorted({row[1] for row in data["train"]})
    counts = {}
    for split, rows in data.items():
        kept = []
        for sentences, label, n in rows:
            if regression:
                try:
                    float(label)
                except ValueError:
                    skipped.append(f"{splits[split]}, line {n}\tlabel {label!r} is not a number (--regression)")
                    continue
            elif label not in classes:
                skipped.append(f"{splits[split]}, line {n}\tlabel {label!r} not seen in train")
                continue
            kept.append((sentences, label))
        if not kept:
            raise SystemExit(f"error: {splits[split]} ({split}): every row's label is unusable ({skipped[-1].split(chr(9))[-1]}); "
                             "fix the labels or pass --regression for numeric targets")
        data[split] = kept
        counts[split] = len(kept)
    n_inputs = len(data["train"][0][0]) if data["train"] else 1
    for k in range(n_inputs):
        prefixes = {}
        for split, rows in data.items():
            prefixes[split] = os.path.join(dest, f"{split}.input{k}.bpe")
            with open(prefixes[split], "w", encoding="utf-8") as f:
                f.writelines(" ".join(sp.encode(s[k], out_type=str)) + "\n" for s, _ in rows)
        binarise(prefixes, dictionary, os.path.join(dest, f"input{k}"))
    for split, rows in data.items():
        with open(os.path.join(dest, f"{split}.label"), "w", encoding="utf-8") as f:
            f.writelines(f"{label if regression else classes.index(label)}\n" for _, label in rows)
    with open(os.path.join(dest, "labels.txt"), "w", encoding="utf-8") as f:
        f.write("" if regression else "".join(c + "\n" for c in classes))
    with open(os.path.join(dest, "skipped.tsv"), "w", encoding="utf-8") as f:
        f.writelines(s + "\n" for s in skipped)
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    return counts | {"inputs": n_inputs, "classes": 0 if regression else len(classes), "skipped": len(skipped)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="TSV of training rows")
    ap.add_argument("--valid", required=True, help="TSV of validation rows")
    ap.add_argument("--test", help="TSV of test rows")
    ap.add_argument("--text-data", required=True, help="the pretraining data directory (spm.model, dict.txt)")
    ap.add_argument("--dest", required=True, help="output directory")
    ap.add_argument("--regression", action="store_true", help="labels are numbers (one regression target)")
    a = ap.parse_args(argv)
    splits = {"train": a.train, "valid": a.valid} | ({"test": a.test} if a.test else {})
    print(" ".join(f"{k}={v}" for k, v in prepare(splits, a.text_data, a.dest, a.regression).items()))


if __name__ == "__main__":
    main()
