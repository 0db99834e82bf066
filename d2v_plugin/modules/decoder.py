"""The light convolutional decoder of data2vec 2.0 (§3.1 "Decoder").

The student encodes only the unmasked tokens; the decoder gets the full-length
sequence back (encoder outputs at kept positions, small noise at masked ones) and
predicts the teacher targets everywhere with ``layers`` x [grouped convolution ->
LayerNorm(no affine) -> GELU] (residual between layers of equal width) and a
projection back to the model dimension. Speech and text convolve over time (1-D);
images over the patch grid (2-D, ``grid=(h, w)``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn
from torch import Tensor

from .positional import conv_norm_gelu
from .settings import DecoderSettings


class ConvDecoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        dim: int = 384,
        kernel: int = 7,
        layers: int = 4,
        groups: int = 16,
        residual: bool = True,
        projection_layers: int = 1,
        projection_ratio: float = 2.0,
        grid: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.grid = grid
        conv = nn.Conv1d if grid is None else nn.Conv2d
        for width in (embed_dim, dim):
            if width % groups != 0:
                raise ValueError(f"decoder_groups={groups} does not divide the decoder input/width {width}")
        self.residual = residual
        self.layers = nn.ModuleList(
            conv(embed_dim if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(layers)
        )
        proj, width = [], dim
        for i in range(projection_layers - 1):
            nxt = int(width * projection_ratio) if i == 0 else width
            proj += [nn.Linear(width, nxt), nn.GELU()]
            width = nxt
        proj.append(nn.Linear(width, embed_dim))
        self.proj = proj[0] if len(proj) == 1 else nn.Sequential(*proj)

    @classmethod
    def from_settings(cls, embed_dim: int, s: DecoderSettings, grid: Optional[Tuple[int, int]] = None) -> "ConvDecoder":
        return cls(embed_dim, s.dim, s.kernel, s.layers, s.groups, s.residual, s.projection_layers, s.projection_ratio, grid)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, T, D) (T = h * w row-major for a grid) -> predictions (B, T, D), or only
        at the ``mask`` (B, T) positions, (N, D): the projection runs on those rows alone."""
        B, T, D = x.shape
        if self.grid is not None:
            x = x.reshape(B, *self.grid, D)  # (B, h, w, D)
        for conv in self.layers:  # channels-last throughout
            y = conv_norm_gelu(conv, x)
            x = x + y if self.residual and x.shape[-1] == y.shape[-1] else y
        x = x.reshape(B, T, -1)
        return self.proj(x if mask is None else x[mask])
