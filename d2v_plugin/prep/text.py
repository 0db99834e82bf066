"""Text for the d2v text tasks: sentencepiece BPE + fairseq binarisation, offline.

    python -m d2v_plugin.prep.text RAW_TEXT --dest DATA [--vocab-size N] [--valid-percent P]

RAW_TEXT has one document (or sentence) per line. Lines are checked first: undecodable
bytes, empty lines and lines longer than ``--max-chars`` are skipped and each is
reported with its line number (stderr and DATA/skipped.tsv). A sentencepiece BPE model
is trained on the training lines (or reused: ``--spm-model``, or DATA/spm.model from an
earlier run), the lines are encoded, and ``fairseq-preprocess --only-source`` writes
DATA/{train,valid}.{bin,idx} and DATA/dict.txt. The sentencepiece model is copied to
DATA/spm.model, so the data directory is self-contained; the text tasks record its
contents in their checkpoints.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
from typing import Dict, List, Tuple


def read_lines(path: str, max_chars: int) -> Tuple[List[str], List[Tuple[int, str]]]:
    """-> usable lines, [(line number, reason)] of the skipped ones."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found")
    good, skipped = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                skipped.append((n, f"undecodable bytes at offset {e.start} (not UTF-8); re-encode the file"))
                continue
            text = " ".join(line.split())
            if not text:
                skipped.append((n, "empty line"))
            elif len(text) > max_chars:
                skipped.append((n, f"{len(text)} characters > --max-chars {max_chars}; split the line"))
            else:
                good.append(text)
    return good, skipped


def train_spm(lines: List[str], prefix: str, vocab_size: int) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, minloglevel=2,
    )


def prepare(raw: str, dest: str, vocab_size: int = 8000, valid_percent: float = 0.01, max_chars: int = 100_000,
            spm_model: str = "", seed: int = 1, workers: int = 1) -> Dict[str, int]:
    os.makedirs(dest, exist_ok=True)
    lines, skipped = read_lines(raw, max_chars)
    for n, reason in skipped:
        print(f"skipped {raw}, line {n}: {reason}", file=sys.stderr)
    with open(os.path.join(dest, "skipped.tsv"), "w", encoding="utf-8") as f:
        f.write("".join(f"{n}\t{reason}\n" for n, reason in skipped))
    if len(lines) < 2:
        raise SystemExit(f"error: {raw} has {len(lines)} usable line(s); need at least 2 (train and valid)")
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(round(len(lines) * valid_percent)))
    splits = {"valid": [lines[i] for i in sorted(order[:n_valid])], "train": [lines[i] for i in sorted(order[n_valid:])]}
    model = os.path.join(dest, "spm.model")
    if spm_model:
        if os.path.abspath(spm_model) != os.path.abspath(model):
            shutil.copy(spm_model, model)
    elif not os.path.isfile(model):
        train_spm(splits["train"], os.path.join(dest, "spm"), vocab_size)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    for split, split_lines in splits.items():
        with open(os.path.join(dest, f"{split}.bpe"), "w", encoding="utf-8") as f:
            f.writelines(" ".join(sp.encode(t, out_type=str)) + "\n" for t in split_lines)
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx"):
        if os.path.exists(os.path.join(dest, name)):
            os.remove(os.path.join(dest, name))
    binary = os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess")
    proc = subprocess.run([binary, "--only-source", "--trainpref", os.path.join(dest, "train.bpe"), "--validpref",
                           os.path.join(dest, "valid.bpe"), "--destdir", dest, "--workers", str(workers),
                           "--dataset-impl", "mmap"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: fairseq-preprocess failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return {"train": len(splits["train"]), "valid": len(splits["valid"]), "skipped": len(skipped),
            "vocab": sp.get_piece_size()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="raw text, one document or sentence per line (UTF-8)")
    ap.add_argument("--dest", required=True, help="output data directory")
    ap.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece BPE vocabulary size")
    ap.add_argument("--valid-percent", type=float, default=0.01, help="fraction of lines for valid")
    ap.add_argument("--max-chars", type=int, default=100_000, help="longer lines are skipped and reported")
    ap.add_argument("--spm-model", default="", help="reuse this sentencepiece model instead of training one")
    ap.add_argument("--seed", type=int, default=1, help="seed of the train/valid split")
    ap.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")
    a = ap.parse_args(argv)
    counts = prepare(a.raw, a.dest, a.vocab_size, a.valid_percent, a.max_chars, a.spm_model, a.seed, a.workers)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
