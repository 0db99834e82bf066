"""The text modality encoder (data2vec 1.0 §3.1 / data2vec 2.0 §3.2, "Natural language processing").

tokens (B, T) --embedding + learned positions + LayerNorm + dropout--> (B, T, D) "local
features" (no embedding scale, as the reference). Then the context stage (LayerNorm
only with prenet blocks) and the shared blocks. A learned position p is given to the
i-th non-padding token as row pad + 1 + i (padding uses row pad), fairseq's convention.
data2vec 2.0: random masking of an exact count of real tokens, the student skips them,
a 1-D conv decoder predicts them, and the teacher is an EMA of the shared blocks only,
fed the *student's* embeddings and prenet output of the unmasked sentence.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .decoder import ConvDecoder
from .ema import teacher_view
from .masking import MaskSettings
from .transformer import ContextEncoder


class TextEncoder(nn.Module):
    modality = "text"

    def __init__(self, cfg, algorithm: str, make_block):
        super().__init__()
        D = cfg.embed_dim
        if cfg.text_vocab_size <= 0:
            raise ValueError("text_vocab_size is 0: build the model through a text task (it sets the dictionary size)")
        self.pad = cfg.text_pad_index
        self.max_positions = cfg.text_max_positions
        self.embed_tokens = nn.Embedding(cfg.text_vocab_size, D, padding_idx=self.pad)
        self.embed_positions = nn.Embedding(cfg.text_max_positions + self.pad + 1, D, padding_idx=self.pad)
        self.layernorm_embedding = nn.LayerNorm(D, eps=1e-5)
        self.dropout = nn.Dropout(cfg.text_dropout)
        prenet = nn.ModuleList(make_block(i, cfg.text_prenet_depth) for i in range(cfg.text_prenet_depth))
        self.context = ContextEncoder(D, cfg.norm_eps, cfg.text_prenet_dropout, prenet,
                                      cfg.layer_norm_first or cfg.text_prenet_depth == 0)
        self.masking = MaskSettings.from_config(cfg, "text")
        self.mask_emb = None
        self.decoder = ConvDecoder.from_config(cfg, "text") if algorithm == "v2" else None
        self.extra_tokens, self.num_extra, self.cls_loss, self.ema_local_encoder = None, 0, 0.0, False
        self.teacher_uses_student_encoder = algorithm == "v2" and cfg.text_ema_encoder_only
        self.zero_padding = False

    def local_features(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """source: (B, T) token ids -> (B, T, D), padding (B, T) | None (True = padding)."""
        if source.shape[1] > self.max_positions:
            raise ValueError(f"{source.shape[1]} tokens exceed text_max_positions={self.max_positions}")
        pad = source.eq(self.pad) if padding_mask is None else padding_mask
        real = (~pad).long()
        positions = torch.cumsum(real, dim=1) * real + self.pad  # (B, T)
        x = self.embed_tokens(source) + self.embed_positions(positions)
        x = self.dropout(self.layernorm_embedding(x))
        return x, (pad if pad.any() else None)

    def frame_lengths(self, padding_mask: Optional[Tensor], batch: int, num_frames: int) -> Tensor:
        if padding_mask is None:
            return torch.full((batch,), num_frames, dtype=torch.long)
        return (~padding_mask).sum(1).cpu()

    def add_positions(self, x: Tensor, padding_mask: Optional[Tensor] = None, zero_mask: Optional[Tensor] = None) -> Tensor:
        return x  # learned positions are part of the local features

    def alibi(self, positions: Tensor) -> None:
        return None

    def teacher_copy(self) -> nn.Module:
        """data2vec 2.0 text: the teacher owns no encoder part (only the shared blocks)."""
        if self.teacher_uses_student_encoder:
            return teacher_view(self, tuple(self._modules), tuple(self._parameters))
        return teacher_view(self, ("decoder",))

    def remove_pretraining_modules(self) -> None:
        self.decoder = None
