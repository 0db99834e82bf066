"""Transformer blocks shared by every modality (data2vec 1.0 §3, data2vec 2.0 §3.1).

A block returns two tensors: its output and the output of its feed-forward network
(FFN) *before* dropout, the residual add and the final LayerNorm. The teacher's
targets are built from the latter (data2vec 1.0 §3.3: "the output of the FFN prior
to the last residual connection").

Attention runs through ``F.scaled_dot_product_attention``; padding and ALiBi enter
as one additive bias, so any fused kernel PyTorch picks gets both. A bf16/fp16 student
on a CPU computes the same attention as two matrix products (``explicit_attention``):
there the fused kernel is the slowest part of the step.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def attention_bias(
    padding_mask: Optional[Tensor], alibi: Optional[Tensor], dtype: torch.dtype
) -> Optional[Tensor]:
    """One additive attention bias from a key padding mask and an ALiBi bias.

    padding_mask: (B, K) bool, True = padding; alibi: (B, H, K, K) float.
    Returns None, a (B, 1, 1, K) bool "may attend" mask, or a (B, H|1, K, K) float bias.
    """
    if alibi is None:
        if padding_mask is None or not padding_mask.any():
            return None
        return (~padding_mask)[:, None, None, :]  # (B, 1, 1, K) True = attend
    bias = alibi.to(dtype)
    if padding_mask is not None and padding_mask.any():
        bias = bias.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    return bias


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v as two batched matrix products: (B, H, T, d) -> (B, H, T, d).

    What ``F.scaled_dot_product_attention`` computes, for bf16/fp16 on a CPU, where its fused
    kernel runs up to 10x slower than these products at the students' shapes (``bench/attention.py``). The CPU softmax of a
    bf16 tensor computes in fp32 and rounds its output once, bit for bit what the reference's
    ``softmax(dtype=float32).to(bf16)`` gives, without the fp32 copy. bias: a bool "may
    attend" mask (B, 1, 1, K) or an additive float bias (B, H|1, T, K)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, T, K)
    if bias is not None:
        scores = scores.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else scores + bias
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}; pick heads dividing the dimension")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_dropout = attention_dropout
        self.proj_dropout = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D/H)
        if bias is not None and bias.dtype != torch.bool:
            bias = bias.to(q.dtype)
        p = self.attention_dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            x = explicit_attention(q, k, v, bias, p)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, T, D/H)
        x = x.transpose(1, 2).reshape(B, T, D)
        return self.proj_dropout(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Transformer block returning ``(output, ffn_output)``.

    Post-LN (the reference's default, ``layer_norm_first=False``)::

        x = norm1(x + attn(x)); t = mlp(x); out = norm2(x + dropout(t))

    Pre-LN (``layer_norm_first=True``; unlike the reference, the MLP keeps its residual)::

        x = x + attn(norm1(x)); t = mlp(norm2(x)); out = x + dropout(t)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        encoder_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        post_mlp_dropout: float = 0.0,
        drop_path_prob: float = 0.0,
        layer_norm_first: bool = False,
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, attention_dropout, encoder_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation_dropout)
        self.post_mlp_dropout = nn.Dropout(post_mlp_dropout)
        self.drop_path_prob = drop_path_prob

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        dp = self.drop_path_prob
        if self.layer_norm_first:
            x = x + drop_path(self.attn(self.norm1(x), bias), dp, self.training)
            t = self.mlp(self.norm2(x))
            x = x + drop_path(self.post_mlp_dropout(t), dp, self.training)
        else:
            x = self.norm1(x + drop_path(self.attn(x, bias), dp, self.training))
            t = self.mlp(x)
            x = self.norm2(x + drop_path(self.post_mlp_dropout(t), dp, self.training))
        return x, t


def run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    bias: Optional[Tensor],
    layerdrop: float = 0.0,
    keep_last: Optional[int] = None,
) -> Tuple[Tensor, List[Tensor]]:
    """Run ``blocks`` in order; return the final output and the FFN outputs.

    x: (B, T, D). ``keep_last`` keeps only the FFN outputs of the last blocks (the
    teacher needs its top K only). Layerdrop skips blocks in training; a skipped
    block contributes no FFN output.
    """
    ffn_outputs: List[Tensor] = []
    first_kept = 0 if keep_last is None else len(blocks) - keep_last
    for i, block in enumerate(blocks):
        if block.training and layerdrop > 0 and torch.rand(()) < layerdrop:
            continue
        x, t = block(x, bias)
        if i >= first_kept:
            ffn_outputs.append(t)
    return x, ffn_outputs


class ContextEncoder(nn.Module):
    """A modality's context stage: LayerNorm (post-LN models) -> dropout -> prenet blocks."""

    def __init__(self, dim: int, norm_eps: float, dropout: float, blocks: nn.ModuleList, layer_norm_first: bool):
        super().__init__()
        self.norm = None if layer_norm_first else nn.LayerNorm(dim, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.blocks = blocks

    def forward(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        x, _ = run_blocks(self.blocks, self.dropout(x), bias, keep_last=0)
        return x
