"""Teacher targets (data2vec 1.0 §3.3 "Targets").

y_t = final_norm( 1/K * sum_{l = L-K+1..L} layer_norm_l( FFN output of block l ) )

``layer_norm`` is one of none | instance (per sample and channel, over time) |
layer (per position, over channels) | batch (per channel, over batch and time), or
several joined by ``_`` and applied left to right (``instance_layer``: instance, then
layer, as the official code does when both of its flags are set); ``final_norm`` is
none | instance | layer | layer_instance. Everything is computed in fp32 without
affine parameters (eps 1e-5).

With ``padding_mask`` given, the instance and batch statistics are taken over real
positions only (the reference includes padded positions, which shifts the targets
of real frames; pass ``padding_mask=None`` to reproduce it).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NORMS = ("none", "instance", "layer", "batch")
EPS = 1e-5


def _masked_moments(x: Tensor, weight: Tensor, dims: tuple) -> tuple:
    """Mean and biased variance of x over dims, counting positions where weight is 1."""
    count = weight.sum(dims, keepdim=True).clamp_min(1.0)
    mean = (x * weight).sum(dims, keepdim=True) / count
    var = ((x - mean) ** 2 * weight).sum(dims, keepdim=True) / count
    return mean, var


def normalize(x: Tensor, kind: str, padding_mask: Optional[Tensor] = None) -> Tensor:
    """x: (B, T, D) -> (B, T, D) fp32, normalised as ``kind`` (``a_b``: a, then b);
    padding_mask (B, T) True = pad."""
    x, kind = x.float(), getattr(kind, "value", kind)  # a config enum or its string
    if "_" in kind:
        for part in kind.split("_"):
            x = normalize(x, part, padding_mask)
        return x
    if kind == "none":
        return x
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], eps=EPS)
    if kind not in ("instance", "batch"):
        raise ValueError(f"unknown target norm {kind!r}; choose one of {NORMS}")
    dims = (1,) if kind == "instance" else (0, 1)
    if padding_mask is None or not padding_mask.any():
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
    else:
        weight = (~padding_mask).unsqueeze(-1).float()  # (B, T, 1)
        mean, var = _masked_moments(x, weight, dims)
    return (x - mean) * torch.rsqrt(var + EPS)


def build_targets(
    layer_outputs: List[Tensor],
    top_k: int,
    layer_norm: str = "instance",
    final_norm: str = "none",
    padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """layer_outputs: per block (B, T, D), first to last. Returns (B, T, D) fp32."""
    if not 1 <= top_k <= len(layer_outputs):
        raise ValueError(f"average_top_k_layers={top_k} but the teacher has {len(layer_outputs)} layers")
    top = layer_outputs[-top_k:]
    y = normalize(top[0], layer_norm, padding_mask)
    for t in top[1:]:
        y = y + normalize(t, layer_norm, padding_mask)
    y = y / len(top)
    if "batch" in getattr(final_norm, "value", final_norm):
        raise ValueError("final target norm 'batch' is not supported; use none, instance, layer or layer_instance")
    return normalize(y, final_norm, padding_mask)
