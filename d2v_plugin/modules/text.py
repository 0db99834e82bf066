"""The text modality encoder (data2vec 1.0 §3.1 / data2vec 2.0 §3.2, "Natural language processing").

tokens (B, T) --embedding + learned positions + LayerNorm + dropout--> (B, T, D) "local
features" (no embedding scale, as the reference). Then the context stage (LayerNorm
only with prenet blocks) and the shared blocks. A learned position p is given to the
i-th non-padding token as row pad + 1 + i (padding uses row pad), fairseq's convention.
data2vec 2.0: random masking of an exact count of real tokens, the student skips them,
a 1-D conv decoder predicts them, and the teacher is an EMA of the shared blocks only,
fed the *student's* embeddings and prenet output of the unmasked sentence.
data2vec 1.0: BERT corruption of the token ids (``corrupt``: masked positions become
``<mask>``, a random word or stay, 80/10/10 by default; the span variant uses 100 %
``<mask>``), the student reads the whole corrupted sentence, and the teacher — EMA
blocks with embeddings *copied* from the student — reads the clean sentence (the
reference fed it ``<pad>`` at every unmasked position, fairseq #4881).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .decoder import ConvDecoder
from .ema import teacher_view
from .encoder import ModalityEncoder
from .masking import MaskSettings
from .settings import Data2VecSettings
from .transformer import ContextEncoder


def prepare_tokens(ids: Tensor, bos: int, max_positions: int) -> Tensor:
    """A sentence's ids (n,) -> the model's input: ``<s>`` first, cut to ``max_positions``."""
    return torch.cat([torch.tensor([bos], dtype=ids.dtype), ids])[:max_positions]


class TextEncoder(ModalityEncoder):
    modality = "text"

    def __init__(self, s: Data2VecSettings, make_block):
        super().__init__()
        t = s.text
        D = s.embed_dim
        if t.vocab_size <= 0:
            raise ValueError("text_vocab_size is 0: build the model through a text task (it sets the dictionary size)")
        if s.algorithm == "v1" and not 0 <= t.mask_index < t.vocab_size:
            raise ValueError(f"text_mask_index={t.mask_index}: data2vec 1.0 text needs the id of <mask>; "
                             "build the model through a text task (it sets it from the dictionary)")
        if s.algorithm == "v1" and s.clone_batch != 1:
            raise ValueError(f"clone_batch={s.clone_batch}: data2vec 1.0 text reads one masked view per sample; set 1")
        self.pad, self.mask_index = t.pad_index, t.mask_index
        self.leave_unmasked_prob, self.random_token_prob = t.leave_unmasked_prob, t.random_token_prob
        if self.leave_unmasked_prob + self.random_token_prob > 1:
            raise ValueError("text_leave_unmasked_prob + text_random_token_prob must not exceed 1")
        self.max_positions = t.max_positions
        self.embed_tokens = nn.Embedding(t.vocab_size, D, padding_idx=self.pad)
        self.embed_positions = nn.Embedding(t.max_positions + self.pad + 1, D, padding_idx=self.pad)
        self.layernorm_embedding = nn.LayerNorm(D, eps=1e-5)
        self.dropout = nn.Dropout(t.dropout)
        prenet = nn.ModuleList(make_block(i, t.prenet_depth) for i in range(t.prenet_depth))
        self.context = ContextEncoder(D, s.norm_eps, t.prenet_dropout, prenet,
                                      s.layer_norm_first or t.prenet_depth == 0)
        self.masking = MaskSettings(t.mask_type, t.mask_prob, t.mask_length, 0.0, s.clone_batch,
                                    keep_ends=t.keep_ends)
        self.decoder = ConvDecoder.from_settings(D, t.decoder) if s.algorithm == "v2" else None
        self.teacher_blocks_only = s.algorithm == "v2" and t.ema_encoder_only
        # v1: the student reads corrupted ids, the teacher embeds the clean ones with copies of
        # the student's embeddings
        self.corrupts_tokens = s.algorithm == "v1"
        self.zero_padding = s.algorithm == "v1"  # padded embeddings are zeros, as fairseq's TransformerEncoder
        self.ema_copied = ("embed_tokens", "embed_positions", "layernorm_embedding") if s.algorithm == "v1" else ()

    def reset_parameters(self) -> None:
        """Nothing after BERT init: unlike speech and images, the reference's text encoder
        keeps the decoder projection at N(0, 0.02)."""

    def local_features(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """source: (B, T) token ids -> (B, T, D), padding (B, T) | None (True = padding)."""
        if source.shape[1] > self.max_positions:
            raise ValueError(f"{source.shape[1]} tokens exceed text_max_positions={self.max_positions}")
        pad = self.padding(source, padding_mask, as_none=False)
        real = (~pad).long()
        positions = torch.cumsum(real, dim=1) * real + self.pad  # (B, T)
        x = self.embed_tokens(source) + self.embed_positions(positions)
        x = self.dropout(self.layernorm_embedding(x))
        if self.zero_padding:  # v1 (fairseq TransformerEncoder): padded embeddings are zeros
            x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        return x, (pad if pad.any() else None)

    def padding(self, source: Tensor, padding_mask: Optional[Tensor] = None, as_none: bool = True) -> Optional[Tensor]:
        """(B, T) True at padding (``<pad>`` ids unless given); None if nothing is padded and ``as_none``."""
        pad = source.eq(self.pad) if padding_mask is None else padding_mask
        return None if as_none and not pad.any() else pad

    def corrupt(self, source: Tensor, mask: Tensor) -> Tensor:
        """data2vec 1.0 / BERT student input. source: (B, T) clean ids, mask: (B, T) True =
        predicted -> (B, T) ids: each masked position keeps its word with probability
        ``leave_unmasked_prob``, gets a uniformly random word (ids 4.., fairseq's ``<s> <pad>
        </s> <unk>`` and ``<mask>`` excluded) with ``random_token_prob``, else ``<mask>``."""
        u = torch.rand(mask.shape, device=source.device)
        out = source.masked_fill(mask & (u >= self.leave_unmasked_prob + self.random_token_prob), self.mask_index)
        swap = mask & (u >= self.leave_unmasked_prob) & (u < self.leave_unmasked_prob + self.random_token_prob)
        words = torch.randint(4, self.embed_tokens.num_embeddings - 1, mask.shape, device=source.device)
        words = words + (words >= self.mask_index).long()  # skip <mask>
        return torch.where(swap, words, out)

    def student_features(self, feats: Tensor, source: Tensor, padding_mask: Optional[Tensor], mask: Tensor) -> Tensor:
        """data2vec 1.0: the student embeds the corrupted sentence (learned positions are part of
        the local features, so ``add_positions`` is the identity)."""
        if self.corrupts_tokens:
            return self.local_features(self.corrupt(source, mask), padding_mask)[0]
        return feats

    def teacher_features(self, teacher: "TextEncoder", feats: Tensor, padding_mask: Optional[Tensor],
                         source: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """data2vec 1.0: the teacher embeds the clean sentence with its copied embeddings."""
        if self.corrupts_tokens:
            return teacher.local_features(source, padding_mask)
        return feats, padding_mask

    def teacher_encoder(self, teacher: "TextEncoder") -> "TextEncoder":
        """data2vec 2.0: the teacher is an EMA of the shared blocks only, fed the student's
        embeddings and context stage."""
        return self if self.teacher_blocks_only else teacher

    def teacher_copy(self) -> nn.Module:
        """data2vec 2.0 text: the teacher owns no encoder part (only the shared blocks);
        1.0: it owns the embeddings too (copied from the student at every step)."""
        if self.teacher_blocks_only:
            return teacher_view(self, tuple(self._modules), tuple(self._parameters))
        return teacher_view(self, ("decoder",))
