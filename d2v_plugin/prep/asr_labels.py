"""Letter targets for CTC fine-tuning, aligned with wav2vec manifests.

    python -m d2v_plugin.prep.asr_labels TRANSCRIPTS_TSV --manifest-dir DATA

TRANSCRIPTS_TSV has one ``audio/path<TAB>text`` line per utterance (paths relative to
the TSV's folder, or absolute; ``d2v_plugin.samples speech`` writes one). For every
manifest ``DATA/{split}.tsv`` this writes, line by line in manifest order:

    DATA/{split}.wrd   normalised words   "IT'S A TEST"
    DATA/{split}.ltr   letters            "I T ' S | A | T E S T |"
and DATA/dict.ltr.txt (fairseq dictionary "symbol count", counted on train).

Text is upper-cased, punctuation other than apostrophes dropped, hyphens split words.
A manifest line without a transcript, an empty transcript, or one with characters
outside the alphabet is reported with its file and line, and nothing is written;
``--drop-bad`` instead removes those lines from the manifests (counted and listed).
``--alphabet auto`` takes the alphabet from the train transcripts (other languages).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import Counter
from typing import Dict, List, Tuple

from ..data.audio import AudioDataError, read_manifest
from ..data.letters import ENGLISH, WORD_SEP, normalize_text, outside, words_to_letters


class LabelError(ValueError):
    """Transcripts that do not cover or fit the manifests."""


def read_transcripts(path: str) -> Dict[str, Tuple[str, int]]:
    """-> {real audio path: (text, line number)}."""
    if not os.path.isfile(path):
        raise LabelError(f"{path}: transcripts file not found")
    base, found, problems = os.path.dirname(os.path.abspath(path)), {}, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f.read().splitlines(), start=1):
            if not line.strip():
                continue
            if "\t" not in line:
                problems.append(f"{path}, line {n}: expected 'audio/path<TAB>text', got {line!r}")
                continue
            audio, text = line.split("\t", 1)
            key = os.path.realpath(os.path.join(base, audio))
            if key in found:
                problems.append(f"{path}, line {n}: second transcript for {audio} (first on line {found[key][1]})")
                continue
            found[key] = (text, n)
    if problems:
        raise LabelError("\n".join(problems))
    return found


def find_manifests(manifest_dir: str) -> Dict[str, str]:
    """{split: path} for every wav2vec manifest in the folder (rejected.tsv is a report, not a manifest)."""
    paths = sorted(glob.glob(os.path.join(manifest_dir, "*.tsv")))
    splits = {os.path.basename(p)[:-4]: p for p in paths if os.path.basename(p) != "rejected.tsv"}
    if not splits:
        raise LabelError(f"{manifest_dir}: no {{split}}.tsv manifest; create them with d2v_plugin.prep.audio_manifest")
    return splits


def prepare(transcripts: str, manifest_dir: str, alphabet: str = "english", drop_bad: bool = False) -> Dict[str, int]:
    """Write .wrd/.ltr per split and dict.ltr.txt; returns {split: lines written, "dropped": n}."""
    texts = read_transcripts(transcripts)
    splits = find_manifests(manifest_dir)
    rows: Dict[str, List[Tuple[str, str, str]]] = {}  # split -> [(manifest line, words, problem)]
    roots = {}
    for split, path in splits.items():
        try:
            root, entries = read_manifest(path)
        except AudioDataError as e:
            raise LabelError(str(e)) from e
        roots[split], rows[split] = root, []
        for rel, n_samples, n in entries:
            line = f"{rel}\t{n_samples}"
            hit = texts.get(os.path.realpath(os.path.join(root, rel)))
            if hit is None:
                rows[split].append((line, "", f"{path}, line {n}: no transcript for {os.path.join(root, rel)} in {transcripts}"))
                continue
            words = normalize_text(hit[0])
            problem = "" if words else f"{transcripts}, line {hit[1]}: empty transcript for {rel} ({path}, line {n})"
            rows[split].append((line, words, problem))
    if alphabet == "english":
        letters = ENGLISH
    elif alphabet == "auto":
        source = rows.get("train") or [r for split_rows in rows.values() for r in split_rows]
        letters = "".join(sorted({c for _, words, _ in source for c in words if c != " "}))
    else:
        letters = alphabet
    if WORD_SEP in letters:
        raise LabelError(f"the alphabet must not contain the word separator {WORD_SEP!r}")
    for split, split_rows in rows.items():
        for i, (line, words, problem) in enumerate(split_rows):
            bad = outside(words, letters) if not problem else ""
            if bad:
                _, n = texts[os.path.realpath(os.path.join(roots[split], line.split("\t")[0]))]
                problem = (f"{transcripts}, line {n}: characters {bad!r} of {words!r} are not in the alphabet "
                           f"({letters}); fix the text, pass --alphabet, or --drop-bad")
            split_rows[i] = (line, words, problem)
    problems = [p for split_rows in rows.values() for _, _, p in split_rows if p]
    if problems and not drop_bad:
        raise LabelError(f"{len(problems)} utterance(s) cannot be labelled (nothing written; --drop-bad removes "
                         "them from the manifests):\n" + "\n".join(problems))
    for p in problems:
        print(f"dropped: {p}", file=sys.stderr)
    counts: Counter = Counter({c: 0 for c in letters + WORD_SEP})
    for split, split_rows in rows.items():
        good = [(line, words) for line, words, problem in split_rows if not problem]
        if len(good) < len(split_rows):
            with open(splits[split], "w", encoding="utf-8") as f:
                f.write(roots[split] + "\n" + "".join(line + "\n" for line, _ in good))
        with open(os.path.join(manifest_dir, f"{split}.wrd"), "w", encoding="utf-8") as f:
            f.write("".join(words + "\n" for _, words in good))
        with open(os.path.join(manifest_dir, f"{split}.ltr"), "w", encoding="utf-8") as f:
            f.write("".join(words_to_letters(words) + "\n" for _, words in good))
        if split == "train" or "train" not in rows:
            counts.update(c for _, words in good for c in words_to_letters(words).split())
    with open(os.path.join(manifest_dir, "dict.ltr.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{c} {n}\n" for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))
    return {split: sum(1 for r in split_rows if not r[2]) for split, split_rows in rows.items()} | {"dropped": len(problems)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("transcripts", help="TSV of audio path and text, one utterance per line")
    ap.add_argument("--manifest-dir", required=True, help="folder with the {split}.tsv manifests; outputs go there")
    ap.add_argument("--alphabet", default="english",
                    help="'english' (A-Z and '), 'auto' (every character of the train transcripts) or the characters")
    ap.add_argument("--drop-bad", action="store_true", help="remove unlabellable lines from the manifests instead of failing")
    a = ap.parse_args(argv)
    try:
        counts = prepare(a.transcripts, a.manifest_dir, a.alphabet, a.drop_bad)
    except LabelError as e:
        sys.exit(f"error: {e}")
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
