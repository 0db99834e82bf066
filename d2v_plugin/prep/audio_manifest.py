"""Write wav2vec manifests for a folder of audio.

    python -m d2v_plugin.prep.audio_manifest AUDIO_DIR --dest OUT --valid-percent 0.01

Every wav/flac/ogg file under AUDIO_DIR is checked (readable, not truncated: a wav's data
no shorter than its header says, sample rate, mono, non-empty); usable files go to OUT/train.tsv and OUT/valid.tsv (and OUT/test.tsv for
the files named by ``--test-list``) (first line the root,
then ``relative/path<TAB>num_samples``); the others are listed with the reason on
stderr and in OUT/rejected.tsv.
"""
from __future__ import annotations

import argparse
import os
import random
from typing import List, Optional, Tuple

import soundfile as sf

from ..data.audio import wav_truncation
from . import write_rejected

EXTENSIONS = ("wav", "flac", "ogg")


def check_audio(path: str, sample_rate: int) -> Tuple[Optional[int], str]:
    """-> (num_samples, "") for a usable file, else (None, reason)."""
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises several types for unreadable files
        return None, f"unreadable: {str(e).splitlines()[0]}"
    truncated = wav_truncation(path)
    if truncated:
        return None, truncated
    if info.frames <= 0:
        return None, "empty: no samples"
    if info.samplerate != sample_rate:
        return None, f"sample rate {info.samplerate} Hz, expected {sample_rate} Hz (resample, e.g. sox in.wav -r {sample_rate} out.wav)"
    if info.channels != 1:
        return None, f"{info.channels} channels, expected mono (e.g. sox in.wav -c 1 out.wav)"
    return int(info.frames), ""


def find_audio(root: str, extensions: List[str]) -> List[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if f.rsplit(".", 1)[-1].lower() in extensions]
    return sorted(found)


def read_list(path: str) -> set:
    """Real paths of the audio files named in the first column of a list/TSV file
    (relative to the file's folder, or absolute)."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        return {os.path.realpath(os.path.join(base, line.split("\t")[0])) for line in f.read().splitlines() if line.strip()}


def write_manifests(root: str, dest: str, valid_percent: float, sample_rate: int = 16000,
                    extensions: List[str] = EXTENSIONS, seed: int = 42, test_list: Optional[str] = None) -> dict:
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise SystemExit(f"error: {root} is not a directory")
    if not 0 <= valid_percent < 1:
        raise SystemExit(f"error: --valid-percent {valid_percent} must be in [0, 1)")
    os.makedirs(dest, exist_ok=True)
    good, rejected = [], []
    for path in find_audio(root, extensions):
        n, reason = check_audio(path, sample_rate)
        (good.append((os.path.relpath(path, root), n)) if n else rejected.append((path, reason)))
    if not good:
        raise SystemExit(f"error: no usable {'/'.join(extensions)} file under {root} ({len(rejected)} rejected)")
    splits = {}
    if test_list:
        held = read_list(test_list)
        splits["test"] = sorted(g for g in good if os.path.join(root, g[0]) in held)
        if len(splits["test"]) < len(held):
            raise SystemExit(f"error: {len(held) - len(splits['test'])} file(s) of {test_list} are not usable audio under {root}")
        good = [g for g in good if os.path.join(root, g[0]) not in held]
    rng = random.Random(seed)
    rng.shuffle(good)
    n_valid = int(round(len(good) * valid_percent))
    splits |= {"valid": sorted(good[:n_valid]), "train": sorted(good[n_valid:])} if n_valid else {"train": sorted(good)}
    for split, rows in splits.items():
        with open(os.path.join(dest, f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write(root + "\n" + "".join(f"{rel}\t{n}\n" for rel, n in rows))
    write_rejected(dest, rejected)
    return {split: len(rows) for split, rows in splits.items()} | {"rejected": len(rejected)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="folder to walk for audio files")
    ap.add_argument("--dest", required=True, help="output folder for train.tsv / valid.tsv / rejected.tsv")
    ap.add_argument("--valid-percent", type=float, default=0.01, help="fraction of files for valid.tsv (0..1)")
    ap.add_argument("--sample-rate", type=int, default=16000, help="required sample rate in Hz")
    ap.add_argument("--ext", default=",".join(EXTENSIONS), help="comma-separated extensions to include")
    ap.add_argument("--seed", type=int, default=42, help="seed of the train/valid split")
    ap.add_argument("--test-list", help="file whose first column lists audio files for test.tsv (held out of train/valid)")
    a = ap.parse_args(argv)
    counts = write_manifests(a.root, a.dest, a.valid_percent, a.sample_rate, [e.lower() for e in a.ext.split(",")], a.seed,
                             a.test_list)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
