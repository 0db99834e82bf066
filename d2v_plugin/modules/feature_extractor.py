"""The waveform feature encoder of wav2vec 2.0 / data2vec speech (wav2vec 2.0 §2).

A stack of 1-D convolutions (no bias), each followed by a LayerNorm over channels
("layer_norm" mode, the data2vec setting; it pairs with normalised waveforms) or, in
"group_norm" mode, a GroupNorm after the first convolution only; then GELU.
The base stack ``[(512,10,5)] + [(512,3,2)]*4 + [(512,2,2)]*2`` turns 16 kHz audio
into 50 frames per second (stride 320, receptive field 400 samples).

The layer spec is parsed by a small grammar, never ``eval``-ed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .positional import conv_channels_last


@dataclass(frozen=True)
class ConvLayerSpec:
    dim: int
    kernel: int
    stride: int


_TERM = re.compile(r"\[\s*((?:\(\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\)\s*,?\s*)+)\]\s*(?:\*\s*(\d+))?")
_TUPLE = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)")


def parse_conv_spec(spec: str) -> List[ConvLayerSpec]:
    """Parse ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"`` into layer specs.

    Grammar: terms joined by ``+``; a term is a bracketed list of ``(dim, kernel,
    stride)`` tuples, optionally ``* repeat``.
    """
    layers: List[ConvLayerSpec] = []
    for raw in spec.split("+"):
        term = raw.strip()
        m = _TERM.fullmatch(term)
        if m is None:
            raise ValueError(
                f"bad conv layer spec term {term!r} in {spec!r}: expected e.g. "
                "\"[(512, 10, 5)] + [(512, 3, 2)] * 4\" (dim, kernel, stride tuples, optional * repeat)"
            )
        tuples = [ConvLayerSpec(*map(int, t)) for t in _TUPLE.findall(m.group(1))]
        layers.extend(tuples * int(m.group(2) or 1))
    if any(layer.dim < 1 or layer.kernel < 1 or layer.stride < 1 for layer in layers):
        raise ValueError(f"conv layer spec {spec!r} has a zero dim, kernel or stride")
    return layers


def conv_output_lengths(lengths: Tensor, layers: List[ConvLayerSpec]) -> Tensor:
    """Frames produced from ``lengths`` samples: floor((L - k) / s + 1) per layer."""
    lengths = lengths.long()
    for layer in layers:
        lengths = torch.div(lengths - layer.kernel, layer.stride, rounding_mode="floor") + 1
    return lengths.clamp_min(0)


def receptive_field(layers: List[ConvLayerSpec]) -> int:
    """Smallest input (samples) that yields one frame."""
    field = 1
    for layer in reversed(layers):
        field = (field - 1) * layer.stride + layer.kernel
    return field


class ConvLayer(nn.Module):
    def __init__(self, in_dim: int, spec: ConvLayerSpec, norm: Optional[str], dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, spec.dim, spec.kernel, stride=spec.stride, bias=False)
        # no bias *entry* either: fairseq's trainer reports every pair of None parameters as shared
        del self.conv._parameters["bias"]
        self.conv.__dict__["bias"] = None
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm_kind = norm
        if norm == "layer_norm":
            self.norm = nn.LayerNorm(spec.dim)
        elif norm == "group_norm":
            self.norm = nn.GroupNorm(spec.dim, spec.dim)
        else:
            self.norm = None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, C_in) time-major -> (B, L', C) (channels-last convolution: the
        LayerNorm over channels needs no transposes)."""
        x = self.dropout(conv_channels_last(self.conv, x))
        if self.norm_kind == "layer_norm":  # normalised in fp32, as fp16 overflows here
            n = self.norm
            x = F.layer_norm(x.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps).type_as(self.conv.weight)
        elif self.norm_kind == "group_norm":  # per-channel statistics over time, on (B, C, L')
            n = self.norm
            x = F.group_norm(x.transpose(1, 2).float(), n.num_groups, n.weight.float(), n.bias.float(), n.eps)
            x = x.transpose(1, 2).type_as(self.conv.weight)
        return F.gelu(x)


class ConvFeatureExtractor(nn.Module):
    def __init__(self, layers: List[ConvLayerSpec], mode: str = "layer_norm", dropout: float = 0.0):
        super().__init__()
        if mode not in ("layer_norm", "group_norm"):
            raise ValueError(f"feature extractor mode {mode!r}: use layer_norm or group_norm")
        self.spec = layers
        dims = [1] + [layer.dim for layer in layers]
        self.layers = nn.ModuleList(
            ConvLayer(dims[i], spec, mode if (mode == "layer_norm" or i == 0) else None, dropout)
            for i, spec in enumerate(layers)
        )

    @property
    def out_dim(self) -> int:
        return self.spec[-1].dim

    def forward(self, wav: Tensor) -> Tensor:
        """wav: (B, L) samples -> (B, C, T) frames (a transposed view of time-major memory,
        so ``.transpose(1, 2)`` gives contiguous (B, T, C) for free)."""
        x = wav.unsqueeze(-1)  # (B, L, 1)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)


def frame_padding_mask(padding_mask: Optional[Tensor], num_frames: int, layers: List[ConvLayerSpec]) -> Optional[Tensor]:
    """Sample-level padding (B, L) -> frame-level padding (B, T); None if nothing is padded."""
    if padding_mask is None or not padding_mask.any():
        return None
    lengths = conv_output_lengths((~padding_mask).sum(-1), layers)  # (B,)
    frames = torch.arange(num_frames, device=padding_mask.device)
    return frames[None, :] >= lengths[:, None]  # (B, T) True = padding

