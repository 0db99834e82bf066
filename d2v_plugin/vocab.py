"""A fairseq ``dict.txt`` read without fairseq: the token ids a text model was trained with.

fairseq's ``Dictionary`` puts ``<s> <pad> </s> <unk>`` at ids 0-3, then one entry per line
of ``dict.txt`` (``TOKEN COUNT``, optionally ``#fairseq:overwrite``), in file order; the
text tasks add ``<mask>`` last. ``encode_line`` splits on whitespace, maps unknown tokens to
``<unk>`` and appends ``</s>``: the same ids as fairseq's (``tests/test_export.py`` checks).
"""
from __future__ import annotations

import io
import re
from typing import Dict, List, Union

import torch

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


class Vocabulary:
    def __init__(self, symbols: List[str]):
        self.symbols = list(symbols)
        self.indices: Dict[str, int] = {}
        for i, s in enumerate(self.symbols):
            self.indices.setdefault(s, i)

    @classmethod
    def load(cls, source: Union[str, io.StringIO], where: str = "") -> "Vocabulary":
        """``source``: a path or an open text stream of fairseq's dict.txt format."""
        text = open(source, encoding="utf-8").read() if isinstance(source, str) else source.read()
        where = where or (source if isinstance(source, str) else "dict.txt")
        symbols, seen = list(SPECIALS), set(SPECIALS)
        for n, line in enumerate(text.splitlines(), start=1):
            parts = line.rstrip().rsplit(" ", 2)
            overwrite = len(parts) == 3 and parts[2] == "#fairseq:overwrite"
            if overwrite:
                parts = parts[:2]
            else:
                parts = line.rstrip().rsplit(" ", 1)
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise ValueError(f"{where}: line {n} is not 'TOKEN COUNT' ({line[:60]!r}); rebuild it with "
                                 "d2v_plugin.prep.text")
            if parts[0] in seen and not overwrite:
                raise ValueError(f"{where}: line {n}: duplicate token {parts[0]!r}")
            seen.add(parts[0])
            symbols.append(parts[0])
        return cls(symbols)

    def add_symbol(self, symbol: str) -> int:
        if symbol not in self.indices:
            self.indices[symbol] = len(self.symbols)
            self.symbols.append(symbol)
        return self.indices[symbol]

    def bos(self) -> int:
        return 0

    def pad(self) -> int:
        return 1

    def eos(self) -> int:
        return 2

    def unk(self) -> int:
        return 3

    def __len__(self) -> int:
        return len(self.symbols)

    def encode_line(self, line: str, append_eos: bool = True, add_if_not_exist: bool = False) -> torch.Tensor:
        """Whitespace-separated tokens -> (T,) int ids (fairseq's ``encode_line``, no additions)."""
        ids = [self.indices.get(tok, self.unk()) for tok in line.split()]
        return torch.tensor(ids + ([self.eos()] if append_eos else []), dtype=torch.int32)
