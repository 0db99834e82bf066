"""Positional information for sequences (data2vec 2.0 §3.2; wav2vec 2.0 §2).

* ALiBi (Press et al. 2022): a per-head bias ``-slope_h * |i - j|`` added to attention
  scores; data2vec 2.0 speech learns one non-negative scale per head on top.
* A convolutional positional encoder: a stack of grouped 1-D convolutions whose
  output is *added* to its input (the "relative positional encoder" of wav2vec 2.0 /
  data2vec).
* Fixed 2-D sin-cos positions for image patches (MAE; data2vec 2.0 images).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def alibi_slopes(num_heads: int) -> List[float]:
    """Geometric ALiBi slopes ``2^(-8 h / H)``; for H not a power of two the
    closest power's slopes are interleaved with those of twice that power."""

    def power_of_two(n: int) -> List[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def alibi_bias_1d(positions: Tensor, slopes: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """ALiBi bias between the given positions.

    positions: (B, K) int, the time index of each token in the sequence (kept tokens
    of a masked sequence keep their original index); slopes: (H,); scale: (H,) or None.
    Returns (B, H, K, K) float32: ``-slope_h * scale_h * |pos_i - pos_j|``.
    """
    dist = (positions[:, :, None] - positions[:, None, :]).abs().float()  # (B, K, K)
    per_head = slopes.float()
    if scale is not None:
        per_head = per_head * scale.float().clamp_min(0)
    return -dist[:, None, :, :] * per_head[None, :, None, None]


def conv_channels_last(conv: nn.Module, x: Tensor) -> Tensor:
    """x: (B, *S, C) contiguous, S one (time) or two (grid) sizes -> ``conv`` over S ->
    (B, *S', C') contiguous. Runs as a channels-last 2-D convolution (a 1-D kernel k is a
    (1, k) kernel), so no layout copies are needed around it or around a LayerNorm over
    channels; same weights and result as ``conv`` on (B, C, *S)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):  # not expressible below: plain layout
        return conv(x.movedim(-1, 1)).movedim(1, -1).contiguous()
    if isinstance(conv, nn.Conv1d):
        y = F.conv2d(x.unsqueeze(1).permute(0, 3, 1, 2), conv.weight.unsqueeze(2), conv.bias, (1, conv.stride[0]),
                     (0, conv.padding[0]), (1, conv.dilation[0]), conv.groups)  # (B, C', 1, T')
        return y.permute(0, 2, 3, 1).squeeze(1)
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def conv_norm_gelu(conv: nn.Module, x: Tensor) -> Tensor:
    """x: (B, *S, C) -> conv (output cropped to S: an even kernel's extra step is
    dropped) -> LayerNorm over channels without affine -> GELU, (B, *S, C'). The unit of
    the positional encoder and of the 2.0 decoders."""
    y = conv_channels_last(conv, x)
    if y.shape[1:-1] != x.shape[1:-1]:
        y = y[(slice(None), *(slice(0, n) for n in x.shape[1:-1]))]
    return F.gelu(F.layer_norm(y, y.shape[-1:]))


def sincos_2d(dim: int, height: int, width: int) -> Tensor:
    """MAE's fixed 2-D sin-cos table, (height * width, dim), row-major over the grid:
    the first half of the channels encodes the column, the second half the row, each
    as [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (dim / 4))."""
    if dim % 4 != 0:
        raise ValueError(f"embed_dim={dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # (D/4,)

    def encode(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1).double() * omega[None]  # (L, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def resize_grid(table: Tensor, old: Tuple[int, int], new: Tuple[int, int]) -> Tensor:
    """(1, old_h * old_w, D) position table -> (1, new_h * new_w, D), bicubic on the grid
    (fine-tuning at another resolution)."""
    if tuple(old) == tuple(new):
        return table
    D = table.shape[-1]
    grid = table.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(table.dtype)


class ConvPositionalEncoder(nn.Module):
    """``depth`` x [Conv1d(k, groups) -> LayerNorm(no affine) -> GELU]; returns only the
    positional term (the caller adds it). k = max(3, width // depth); an even kernel
    drops its last output step so the length is unchanged."""

    def __init__(self, dim: int, width: int, depth: int, groups: int):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"embed_dim={dim} is not divisible by conv_pos_groups={groups}")
        self.kernel = max(3, width // depth)
        self.layers = nn.ModuleList(
            nn.Conv1d(dim, dim, self.kernel, padding=self.kernel // 2, groups=groups) for _ in range(depth)
        )

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, T, D) -> (B, T, D). With ``padding_mask`` (B, T) padded frames are zeroed
        between layers too, so a padded row gets exactly what it gets alone."""
        keep = None if padding_mask is None else (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        for conv in self.layers:
            x = conv_norm_gelu(conv, x)
            if keep is not None:
                x = x * keep
        return x
