"""Letter units for CTC speech recognition (the wav2vec / data2vec ``.ltr`` layout).

    text "It's a test" -> words "IT'S A TEST" -> letters "I T ' S | A | T E S T |"

``|`` separates words and ends every line; ``letters_to_words`` is the inverse
(fairseq's ``--post-process letter``). ``errors`` counts edit operations between
reference and hypothesis, used for UER/CER and WER.
"""
from __future__ import annotations

import re
import string
from typing import Iterable, Sequence, Tuple

import editdistance

WORD_SEP = "|"
ENGLISH = string.ascii_uppercase + "'"
_DROP = re.compile(r"[\"\u201c\u201d,.;:!?()\[\]{}]")  # punctuation removed before spelling
_SPACE = re.compile(r"[\s\-\u2013\u2014/]+")  # hyphens, dashes and slashes separate words


def normalize_text(text: str) -> str:
    """Upper-case, drop punctuation (keeping apostrophes), one space between words."""
    text = _DROP.sub("", text.upper().replace("\u2019", "'"))
    return _SPACE.sub(" ", text).strip()


def words_to_letters(words: str) -> str:
    """ "IT'S A" -> "I T ' S | A |" """
    return " ".join(" ".join(w) + " " + WORD_SEP for w in words.split())


def letters_to_words(letters: str) -> str:
    """ "I T ' S | A |" -> "IT'S A" """
    return letters.replace(" ", "").replace(WORD_SEP, " ").strip()


def outside(text: str, alphabet: Iterable[str]) -> str:
    """Characters of ``text`` (other than spaces) missing from ``alphabet``, in order of appearance."""
    allowed = set(alphabet) | {" "}
    return "".join(dict.fromkeys(c for c in text if c not in allowed))


def errors(ref: Sequence, hyp: Sequence) -> Tuple[int, int]:
    """-> (edit distance, reference length) between two token sequences."""
    return editdistance.eval(list(ref), list(hyp)), len(ref)
