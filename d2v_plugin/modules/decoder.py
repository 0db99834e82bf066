"""The light convolutional decoder of data2vec 2.0 (§3.1 "Decoder").

The student encodes only the unmasked tokens; the decoder gets the full-length
sequence back (encoder outputs at kept positions, small noise at masked ones) and
predicts the teacher targets everywhere with ``layers`` x [grouped Conv1d ->
LayerNorm(no affine) -> GELU] (residual between layers of equal width) and a
projection back to the model dimension.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .positional import conv_norm_gelu


class ConvDecoder1d(nn.Module):
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
    ):
        super().__init__()
        for width in (embed_dim, dim):
            if width % groups != 0:
                raise ValueError(f"decoder_groups={groups} does not divide the decoder input/width {width}")
        self.residual = residual
        self.layers = nn.ModuleList(
            nn.Conv1d(embed_dim if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(layers)
        )
        proj, width = [], dim
        for i in range(projection_layers - 1):
            nxt = int(width * projection_ratio) if i == 0 else width
            proj += [nn.Linear(width, nxt), nn.GELU()]
            width = nxt
        proj.append(nn.Linear(width, embed_dim))
        self.proj = proj[0] if len(proj) == 1 else nn.Sequential(*proj)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        x = x.transpose(1, 2)  # (B, D, T)
        for conv in self.layers:
            y = conv_norm_gelu(conv, x)
            x = x + y if self.residual and x.shape[1] == y.shape[1] else y
        return self.proj(x.transpose(1, 2))
