"""A word n-gram language model and lexicon for beam-search CTC decoding, offline.

    python -m d2v_plugin.prep.lm TEXT [TEXT ...] --order 4 --out DIR \\
        [--dict ASR_DATA/dict.ltr.txt] [--exclude ASR_DATA/test.wrd ...] [--lmplz PATH]

TEXT: plain text, one sentence per line. Lines are normalised as the labels are
(``prep.asr_labels``: upper case, punctuation but apostrophes dropped). Writes

    DIR/lm.arpa      interpolated modified Kneser-Ney (Chen & Goodman 1998), ARPA format
    DIR/lexicon.txt  "WORD<TAB>W O R D |": each word spelled in the label units
    DIR/lm.json      what was counted, skipped and estimated

``--exclude`` drops the sentences of these files (e.g. the test transcripts, so the LM
never saw them). Words with characters outside the labels' alphabet (``--dict``,
default English letters and apostrophe) cannot be spelled: they are counted, listed and
left out of the lexicon. An empty corpus is an error.

The estimate is KenLM's ``lmplz`` recipe (adjusted counts, three discounts per order,
interpolation with a uniform distribution) written out for corpora of up to a few
million words; KenLM's estimator is not installable from PyPI or Debian. With
``--lmplz PATH`` (KenLM's binary, built from its sources) that binary estimates instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

from ..data.letters import ENGLISH, WORD_SEP, normalize_text, outside

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
Gram = Tuple[str, ...]
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # lmplz --discount_fallback


class LMError(ValueError):
    """A corpus or alphabet that cannot make a language model."""


def read_sentences(paths: Sequence[str], exclude: Sequence[str] = ()) -> Tuple[List[List[str]], dict]:
    """-> (normalised sentences as word lists, counts of what was read and left out)."""
    banned = set()
    for path in exclude:
        if not os.path.isfile(path):
            raise LMError(f"{path}: --exclude file not found")
        with open(path, encoding="utf-8") as f:
            banned.update(normalize_text(line) for line in f if line.strip())
    sentences, stats = [], {"lines": 0, "empty": 0, "excluded": 0}
    for path in paths:
        if not os.path.isfile(path):
            raise LMError(f"{path}: text file not found")
        with open(path, encoding="utf-8", errors="strict") as f:
            for line in f:
                stats["lines"] += 1
                text = normalize_text(line)
                if not text:
                    stats["empty"] += 1
                elif text in banned:
                    stats["excluded"] += 1
                else:
                    sentences.append(text.split())
    if not sentences:
        raise LMError(f"{', '.join(paths)}: no sentences to count ({stats['lines']} lines, {stats['empty']} empty, "
                      f"{stats['excluded']} excluded); give a text file with one sentence per line")
    return sentences, stats


def count_ngrams(sentences: Iterable[List[str]], order: int) -> List[Counter]:
    """-> counts[n-1][gram] of every n-gram (n = 1..order) of "<s> w1 .. wm </s>"."""
    counts = [Counter() for _ in range(order)]
    for words in sentences:
        padded = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(padded) - n + 1):
                counts[n - 1][tuple(padded[i : i + n])] += 1
    return counts


def adjusted_counts(counts: List[Counter]) -> List[Counter]:
    """Kneser-Ney counts: the highest order keeps its counts; a lower-order n-gram counts
    the distinct words seen before it, except one starting with <s> (nothing precedes it)."""
    adjusted = [Counter() for _ in counts]
    adjusted[-1] = Counter(counts[-1])
    for n in range(len(counts) - 1, 0, -1):  # from the (n+1)-grams, continuation counts of n-grams
        for gram in counts[n]:
            adjusted[n - 1][gram[1:]] += 1
    for n, level in enumerate(counts[:-1]):
        for gram, c in level.items():
            if gram[0] == BOS:
                adjusted[n][gram] = c
    return adjusted


def discounts(level: Counter) -> Tuple[Tuple[float, float, float], bool]:
    """Chen & Goodman's D1, D2, D3+ from the count-of-counts of one order -> (D, fell back)."""
    t = Counter(c for c in level.values() if c <= 4)  # t[k]: n-grams seen exactly k times
    try:
        y = t[1] / (t[1] + 2 * t[2])
        d = (1 - 2 * y * t[2] / t[1], 2 - 3 * y * t[3] / t[2], 3 - 4 * y * t[4] / t[3])
    except ZeroDivisionError:
        return FALLBACK_DISCOUNTS, True
    if not all(0 < x < k + 1 for k, x in enumerate(d)):
        return FALLBACK_DISCOUNTS, True
    return d, False


def estimate(counts: List[Counter]) -> Tuple[List[Dict[Gram, float]], List[Dict[Gram, float]], dict]:
    """-> (prob[n-1][gram] = p(w | h), backoff[n-1][h] = gamma(h), discounts per order):
    p(w | h) = (a(hw) - D(a(hw))) / a(h.) + gamma(h) p(w | h'), with h' = h minus its first
    word, and p(w) interpolated with the uniform distribution over the vocabulary."""
    adjusted = adjusted_counts(counts)
    vocab = sorted({g[0] for g in counts[0]} - {BOS} | {UNK})
    probs, backoffs, used = [], [], {}
    for n, level in enumerate(adjusted, start=1):
        if n == 1:
            level = Counter({g: c for g, c in level.items() if g[0] != BOS})  # <s> is never predicted
        d, fell_back = discounts(level)
        used[n] = {"D1": d[0], "D2": d[1], "D3+": d[2], "fallback": fell_back}
        total, kinds = defaultdict(float), defaultdict(lambda: [0, 0, 0])
        for gram, c in level.items():
            total[gram[:-1]] += c
            kinds[gram[:-1]][min(c, 3) - 1] += 1
        gamma = {h: sum(di * k for di, k in zip(d, kinds[h])) / total[h] for h in total}
        lower = probs[-1] if probs else None
        prob = {}
        for gram, c in level.items():
            h = gram[:-1]
            below = lower[gram[1:]] if lower is not None else 1.0 / len(vocab)
            prob[gram] = (c - d[min(c, 3) - 1]) / total[h] + gamma[h] * below
        if n == 1:
            prob[(UNK,)] = prob.get((UNK,), 0.0) or gamma[()] / len(vocab)
        probs.append(prob)
        backoffs.append(gamma)
    return probs, backoffs, used


def write_arpa(path: str, probs: List[Dict[Gram, float]], backoffs: List[Dict[Gram, float]]) -> None:
    """ARPA text: per order "log10 p<TAB>w1 .. wn[<TAB>log10 backoff]"; <s> has p = 0 (-99)."""
    grams = [dict(level) for level in probs]
    grams[0][(BOS,)] = 0.0
    order = len(grams)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\\data\\\n" + "".join(f"ngram {n}={len(g)}\n" for n, g in enumerate(grams, start=1)) + "\n")
        for n, level in enumerate(grams, start=1):
            f.write(f"\\{n}-grams:\n")
            contexts = backoffs[n] if n < order else {}
            for gram in sorted(level):
                p = level[gram]
                line = f"{math.log10(p) if p > 0 else -99:.7f}\t{' '.join(gram)}"
                if gram in contexts:
                    line += f"\t{math.log10(contexts[gram]) if contexts[gram] > 0 else -99:.7f}"
                f.write(line + "\n")
            f.write("\n")
        f.write("\\end\\\n")


def read_alphabet(dict_path: str) -> List[str]:
    """The label units of a fairseq letter dictionary ("symbol count" lines) but the word separator."""
    if not os.path.isfile(dict_path):
        raise LMError(f"{dict_path}: label dictionary not found (DATA/dict.ltr.txt from prep.asr_labels)")
    with open(dict_path, encoding="utf-8") as f:
        units = [line.split()[0] for line in f if line.strip()]
    if WORD_SEP not in units:
        raise LMError(f"{dict_path}: no word separator {WORD_SEP!r}; the lexicon needs letter labels (prep.asr_labels)")
    return [u for u in units if u != WORD_SEP]


def write_lexicon(path: str, words: Counter, alphabet: Sequence[str]) -> dict:
    """One "WORD<TAB>W O R D |" line per spellable word -> what was left out."""
    bad = {w: outside(w, alphabet) for w in words if outside(w, alphabet)}
    with open(path, "w", encoding="utf-8") as f:
        for w in sorted(words):
            if w not in bad:
                f.write(f"{w}\t{' '.join(w)} {WORD_SEP}\n")
    return {"words": len(words) - len(bad), "unspellable_words": len(bad),
            "unspellable_occurrences": sum(words[w] for w in bad),
            "unspellable_examples": {w: bad[w] for w in sorted(bad, key=lambda w: -words[w])[:10]}}


def run_lmplz(lmplz: str, sentences: List[List[str]], order: int, arpa: str) -> None:
    if not os.access(lmplz, os.X_OK):
        raise LMError(f"{lmplz}: not an executable (KenLM's lmplz)")
    text = "".join(" ".join(s) + "\n" for s in sentences)
    with open(arpa, "w") as out:
        done = subprocess.run([lmplz, "-o", str(order), "--discount_fallback"], input=text, text=True, stdout=out,
                              stderr=subprocess.PIPE)
    if done.returncode:
        raise LMError(f"{lmplz} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")


def build(paths: Sequence[str], order: int, out: str, dict_path: str = "", exclude: Sequence[str] = (),
          lmplz: str = "") -> dict:
    """Count, estimate, write DIR/lm.arpa, DIR/lexicon.txt, DIR/lm.json -> the summary."""
    if order < 1:
        raise LMError(f"--order {order}: the order must be at least 1")
    alphabet = read_alphabet(dict_path) if dict_path else list(ENGLISH)
    sentences, stats = read_sentences(paths, exclude)
    os.makedirs(out, exist_ok=True)
    arpa = os.path.join(out, "lm.arpa")
    counts = count_ngrams(sentences, order)
    if lmplz:
        run_lmplz(lmplz, sentences, order, arpa)
        used = {"estimator": lmplz}
    else:
        probs, backoffs, used = estimate(counts)
        write_arpa(arpa, probs, backoffs)
    words = Counter(w for s in sentences for w in s)
    lexicon = write_lexicon(os.path.join(out, "lexicon.txt"), words, alphabet)
    summary = {"text": list(paths), "order": order, **stats, "sentences": len(sentences),
               "tokens": sum(words.values()), "ngrams": {n + 1: len(c) for n, c in enumerate(counts)},
               "discounts": used, "lexicon": lexicon, "alphabet": "".join(alphabet), "arpa": arpa}
    with open(os.path.join(out, "lm.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", nargs="+", help="plain-text files, one sentence per line")
    ap.add_argument("--order", type=int, default=4, help="n-gram order")
    ap.add_argument("--out", required=True, help="output folder (lm.arpa, lexicon.txt, lm.json)")
    ap.add_argument("--dict", default="", help="the labels' dictionary (dict.ltr.txt): its letters are the alphabet")
    ap.add_argument("--exclude", nargs="*", default=[], help="files whose sentences the LM must not see (test transcripts)")
    ap.add_argument("--lmplz", default="", help="KenLM's lmplz binary to estimate with instead (large corpora)")
    a = ap.parse_args(argv)
    try:
        s = build(a.text, a.order, a.out, a.dict, a.exclude, a.lmplz)
    except (LMError, UnicodeDecodeError) as e:
        sys.exit(f"error: {e}")
    lex = s["lexicon"]
    if lex["unspellable_words"]:
        examples = ", ".join(f"{w} ({c})" for w, c in lex["unspellable_examples"].items())
        print(f"skipped {lex['unspellable_words']} words ({lex['unspellable_occurrences']} occurrences) with characters "
              f"outside the alphabet {s['alphabet']!r}, e.g. {examples}; they stay in the LM but not in the lexicon",
              file=sys.stderr)
    if not lex["words"]:
        sys.exit(f"error: no word of {', '.join(a.text)} can be spelled with the alphabet {s['alphabet']!r}")
    print(f"{s['order']}-gram LM of {s['sentences']} sentences ({s['tokens']} words, {s['excluded']} sentences "
          f"excluded): {s['arpa']} ({', '.join(f'{n}-grams {c}' for n, c in s['ngrams'].items())}); "
          f"lexicon {lex['words']} words: {os.path.join(a.out, 'lexicon.txt')}")


if __name__ == "__main__":
    main()
