"""Masks as data (data2vec 1.0 §3.2, data2vec 2.0 §3.3).

Every mask here is a bool tensor, True = hidden from the student, drawn from an
explicit ``torch.Generator`` so a (seed, epoch, sample ids) triple reproduces it in
any process. Padding (positions >= a row's length) is never masked.

* ``block_mask_1d`` (data2vec 2.0 speech): blocks of ``mask_length`` frames around
  random centres, then single frames are added or removed at random until exactly
  ``int(length * mask_prob)`` frames of the row are masked.
* ``span_mask_1d`` (data2vec 1.0 / wav2vec 2.0): ``int(mask_prob * length /
  mask_length + u)`` span starts (u ~ U[0,1)), each masking ``mask_length`` frames;
  spans may overlap (p=0.65, length 10 masks about half of the frames).
* ``block_mask_2d`` (data2vec 2.0 images): ``mask_length`` x ``mask_length`` blocks of
  patches around random centres, trimmed/topped up to an exact count; with
  ``inverse`` the blocks are what stays *visible* (``int(L * (1 - p))`` patches) and
  everything else is masked.
* ``beit_mask_2d`` (data2vec 1.0 images, BEiT): rectangles of at least ``min_patches``
  patches with random area and aspect ratio in [0.3, 1/0.3] until ``int(L * p)``
  patches are masked (topped up at random when no rectangle fits any more).
* ``random_mask_1d`` (data2vec 2.0 text, BERT): exactly ``int(n * mask_prob)`` of a row's n
  positions, uniformly. With ``keep_ends`` a text mask spares a row's first and last
  position (``<s>``, ``</s>``); by default every position can be masked, as in the official code.
* ``kept_positions``: where the unmasked tokens are, in increasing time order.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, epoch, ids...) — stable across
    processes, unlike Python's salted ``hash``."""
    state = 0x9E3779B97F4A7C15
    for k in keys:
        state = (state ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(state & 0x7FFFFFFFFFFFFFFF)


def _fix_count(row: Tensor, target: int, generator: torch.Generator) -> None:
    """Flip random positions of the 1-D bool ``row`` in place until it has ``target`` Trues."""
    n = int(row.sum())
    if n == target:
        return
    pool = row.nonzero().squeeze(1) if n > target else (~row).nonzero().squeeze(1)
    pick = pool[torch.randperm(len(pool), generator=generator)[: abs(n - target)]]
    row[pick] = n < target


def block_mask_1d(
    lengths: Tensor,
    num_frames: int,
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """lengths: (B,) valid frames per row -> (B, num_frames) bool with exactly
    ``int(lengths[b] * mask_prob)`` masked frames in row b, none in its padding."""
    mask = torch.zeros(len(lengths), num_frames, dtype=torch.bool)
    offsets = torch.arange(mask_length) - mask_length // 2
    for b, length in enumerate(lengths.tolist()):
        if length <= 0:
            continue
        n_centres = int(length * (mask_prob + mask_prob_adjust) / mask_length)
        if n_centres > 0:
            centres = torch.randint(0, length, (n_centres,), generator=generator)
            mask[b, (centres[:, None] + offsets).clamp(0, length - 1).flatten()] = True
        _fix_count(mask[b, :length], int(length * mask_prob), generator)
    return mask


def block_mask_2d(
    rows: int,
    grid: Tuple[int, int],
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    inverse: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """-> (rows, h * w) bool, row-major over the patch grid, with exactly
    ``L - int(L * (1 - p))`` masked patches if ``inverse`` else ``int(L * p)``."""
    h, w = grid
    L = h * w
    p = 1.0 - mask_prob if inverse else mask_prob  # fraction covered by blocks
    n_centres = int(L * (p + mask_prob_adjust) / mask_length**2)
    offsets = torch.arange(mask_length) - mask_length // 2
    blocks = torch.zeros(rows, h, w, dtype=torch.bool)
    for r in range(rows):
        if n_centres > 0:
            centres = torch.randint(0, L, (n_centres,), generator=generator)
            ys = (centres[:, None] // w + offsets).clamp(0, h - 1)  # (n, len)
            xs = (centres[:, None] % w + offsets).clamp(0, w - 1)
            blocks[r, ys[:, :, None], xs[:, None, :]] = True
        _fix_count(blocks[r].view(-1), int(L * p), generator)
    blocks = blocks.view(rows, L)
    return ~blocks if inverse else blocks


def beit_mask_2d(
    rows: int,
    grid: Tuple[int, int],
    mask_prob: float,
    min_patches: int = 16,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """-> (rows, h * w) bool with exactly ``int(L * mask_prob)`` masked patches, mostly in
    rectangles of >= ``min_patches`` patches, random aspect ratio in [0.3, 1/0.3]."""
    h, w = grid
    target = int(h * w * mask_prob)
    min_patches = max(1, min(min_patches, target))
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=generator))  # noqa: E731
    mask = torch.zeros(rows, h, w, dtype=torch.bool)
    for r in range(rows):
        count, failures = 0, 0
        while count < target and failures < 10:
            area = u(min_patches, target - count if target - count > min_patches else min_patches)
            aspect = math.exp(u(*log_aspect))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (0 < bh <= h and 0 < bw <= w):
                failures += 1
                continue
            top = int(torch.randint(0, h - bh + 1, (), generator=generator))
            left = int(torch.randint(0, w - bw + 1, (), generator=generator))
            new = int((~mask[r, top : top + bh, left : left + bw]).sum())
            if 0 < new <= target - count:
                mask[r, top : top + bh, left : left + bw] = True
                count, failures = count + new, 0
            else:
                failures += 1
        _fix_count(mask[r].view(-1), target, generator)
    return mask.view(rows, h * w)


def random_mask_1d(lengths: Tensor, num_frames: int, mask_prob: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """lengths: (B,) -> (B, num_frames) bool with exactly ``int(n * mask_prob)`` of the n
    valid positions of each row masked, chosen uniformly; padding is never masked."""
    mask = torch.zeros(len(lengths), num_frames, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        if n > 0:
            mask[b, torch.randperm(n, generator=generator)[: int(n * mask_prob)]] = True
    return mask


def span_mask_1d(
    lengths: Tensor,
    num_frames: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """lengths: (B,) -> (B, num_frames) bool of overlapping spans, none in padding."""
    mask = torch.zeros(len(lengths), num_frames, dtype=torch.bool)
    for b, length in enumerate(lengths.tolist()):
        u = float(torch.rand((), generator=generator))
        n_spans = max(min_masks, int(mask_prob * length / mask_length + u))
        span = min(mask_length, length)
        n_starts = length - span + 1
        if n_starts <= 0:
            continue
        starts = torch.randperm(n_starts, generator=generator)[: min(n_spans, n_starts)]
        mask[b, (starts[:, None] + torch.arange(span)).flatten()] = True
    return mask


def kept_positions(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """mask: (B, T) bool -> keep_ids (B, K), keep_padding (B, K) bool.

    K is the largest number of unmasked positions in a row; rows with fewer get
    trailing filler entries (pointing at masked positions) marked True in
    ``keep_padding``. The kept tokens keep their time order (a stable sort), unlike
    the reference's unstable argsort.
    """
    counts = (~mask).sum(1)  # (B,)
    K = int(counts.max()) if mask.numel() else 0
    keep_ids = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, :K]  # (B, K)
    keep_padding = torch.arange(K, device=mask.device)[None, :] >= counts[:, None]
    return keep_ids, keep_padding


class MaskSettings:
    """How one modality draws its masks: kind, prob, length, adjust, and how many masked
    views (``clone_batch``) each sample gets. Sequences (speech, text): ``block`` or
    ``span`` or ``random``, with ``keep_ends`` (text) the first and last valid position of
    each row (``<s>``, ``</s>``) stay visible; patch grids (``grid=(h, w)``): ``block``,
    ``inverse_block`` or ``beit`` (``length`` = the smallest BEiT rectangle in patches)."""

    KINDS = ("block", "span", "random", "inverse_block", "beit")

    def __init__(self, kind: str, prob: float, length: int, adjust: float = 0.0, clone_batch: int = 1,
                 grid: Optional[Tuple[int, int]] = None, keep_ends: bool = False):
        allowed = ("block", "inverse_block", "beit") if grid is not None else ("block", "span", "random")
        if kind not in allowed:
            raise ValueError(f"mask type {kind!r}: choose one of {allowed}")
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"mask_prob={prob} must be in [0, 1)")
        if length < 1 or clone_batch < 1:
            raise ValueError(f"mask_length={length} and clone_batch={clone_batch} must be >= 1")
        self.kind, self.prob, self.length, self.adjust, self.clone_batch = kind, prob, length, adjust, clone_batch
        self.grid, self.keep_ends = grid, keep_ends

    def __call__(self, lengths: Tensor, num_frames: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """lengths: (B,) valid positions per sample -> (B * clone_batch, num_frames) bool;
        row b * clone_batch + c is view c of sample b."""
        lengths = lengths.repeat_interleave(self.clone_batch)
        if self.grid is not None:
            if num_frames != self.grid[0] * self.grid[1]:
                raise ValueError(f"{num_frames} patches do not make the {self.grid} grid")
            if self.kind == "beit":
                return beit_mask_2d(len(lengths), self.grid, self.prob, self.length, generator)
            return block_mask_2d(len(lengths), self.grid, self.prob, self.length, self.adjust,
                                 self.kind == "inverse_block", generator)
        if self.keep_ends:  # mask inside [1, length - 1): positions shift right by one
            inner = self.draw_1d((lengths - 2).clamp(min=0), num_frames, generator)
            return nn.functional.pad(inner, (1, 0))[:, :num_frames]
        return self.draw_1d(lengths, num_frames, generator)

    def draw_1d(self, lengths: Tensor, num_frames: int, generator: Optional[torch.Generator]) -> Tensor:
        if self.kind == "block":
            return block_mask_1d(lengths, num_frames, self.prob, self.length, self.adjust, generator)
        if self.kind == "random":
            return random_mask_1d(lengths, num_frames, self.prob, generator)
        return span_mask_1d(lengths, num_frames, self.prob, self.length, generator=generator)
