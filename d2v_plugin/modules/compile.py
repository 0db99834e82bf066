"""Optional ``torch.compile`` of the shared Transformer blocks (student and teacher).

Compiling is a speed option, never a requirement: a forward + backward through one
compiled block probes the toolchain first, and a graph that fails later (a new shape,
an unsupported op) switches the blocks back to eager for the rest of the run, each with
one warning. ``nn.Module.compile`` compiles in place, so parameter names and checkpoints
do not change.
"""
from __future__ import annotations

import logging
from typing import List

import torch
import torch.nn as nn

from .transformer import run_blocks

logger = logging.getLogger(__name__)


def first_line(err: Exception) -> str:
    """``Type: first line of the message``, for one-line warnings."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class CompiledBlocksMixin:
    """For a model with ``blocks`` and a ``teacher`` (or None) holding ``blocks``."""

    compiled: bool = False

    def shared_blocks(self) -> List[nn.Module]:
        return list(self.blocks) + (list(self.teacher.blocks) if self.teacher is not None else [])

    def compile_blocks(self) -> bool:
        """Compile every shared block in place; on failure they stay eager and a warning says why."""
        blocks = self.shared_blocks()
        try:
            for b in blocks:
                b.compile(dynamic=True)
            probe = blocks[0]
            x = torch.randn(2, 3, probe.norm1.weight.shape[0], device=probe.norm1.weight.device, requires_grad=True)
            sum(t.sum() for t in probe(x)).backward()
            probe.zero_grad(set_to_none=True)
            self.compiled = True
        except Exception as err:  # no compiler, unsupported platform or op: keep the eager blocks
            self.uncompile_blocks()
            logger.warning("model.compile_blocks: torch.compile failed (%s); running the blocks eagerly", first_line(err))
        return self.compiled

    def uncompile_blocks(self) -> None:
        for b in self.shared_blocks():
            b._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
        self.compiled = False

    def run_shared_blocks(self, blocks, x, bias, layerdrop: float, keep_last):
        """``transformer.run_blocks``, once more eagerly if a compiled graph fails."""
        try:
            return run_blocks(blocks, x, bias, layerdrop, keep_last)
        except Exception as err:  # a graph torch.compile cannot build: fall back for good
            if not self.compiled:
                raise
            self.uncompile_blocks()
            logger.warning("model.compile_blocks: compiled blocks failed (%s); running them eagerly from now on",
                           first_line(err))
            return run_blocks(blocks, x, bias, layerdrop, keep_last)
