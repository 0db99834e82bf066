"""What the data2vec core may ask of a modality encoder (data2vec 2.0 §3.2, "modality-specific encoders").

A modality encoder turns a raw input into a sequence of D-dimensional tokens and owns
what differs between speech, images and text; everything else (the shared blocks, the
teacher, targets, the loss) lives in ``data2vec.py`` and talks to an encoder only
through the methods below. A new modality is one file with one ``ModalityEncoder``
subclass.

Shapes: B samples, T positions (frames, patches, tokens), D model width, E extra tokens.
``padding_mask`` is bool (B, T), True = padding; ``mask`` is bool (B * views, T), True =
hidden from the student.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .masking import MaskSettings


class ModalityEncoder(nn.Module):
    modality: str = ""
    #: how the modality draws its masks (kind, ratio, span, views per sample)
    masking: MaskSettings
    #: v1: learned (D,) embedding that replaces masked positions in the student, or None
    mask_emb: Optional[nn.Parameter]
    #: v2: the conv decoder that predicts the targets at masked positions, or None
    decoder: Optional[nn.Module]
    #: learned tokens (1, E, D) prepended after masking (the image CLS), or None
    extra_tokens: Optional[nn.Parameter]
    #: weight of the v2 CLS loss (the last extra token's output vs the mean target); 0 = off
    cls_loss_weight: float = 0.0
    #: names of sub-modules the teacher copies from the student instead of averaging
    ema_copied: Tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.mask_emb = self.decoder = self.extra_tokens = None  # a subclass sets those it has

    @property
    def num_extra(self) -> int:
        """E, the number of extra tokens."""
        return 0 if self.extra_tokens is None else self.extra_tokens.shape[1]

    # -- shared by student and teacher -----------------------------------------------------
    def local_features(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Raw batch -> local features (B, T, D) and their padding (B, T) | None."""
        raise NotImplementedError

    def frame_lengths(self, padding_mask: Optional[Tensor], batch: int, num_frames: int) -> Tensor:
        """(B,) real positions per sample, for drawing masks (on the CPU)."""
        if padding_mask is None:
            return torch.full((batch,), num_frames, dtype=torch.long)
        return (~padding_mask).sum(1).cpu()

    def add_positions(self, x: Tensor, padding_mask: Optional[Tensor], zero_mask: Optional[Tensor] = None) -> Tensor:
        """(B, T, D) full sequence -> the same with positional information; positions in
        ``zero_mask`` (B, T) are hidden from a positional encoder that mixes neighbours."""
        return x

    def alibi(self, positions: Tensor) -> Optional[Tensor]:
        """positions (B, K): the index of each token -> ALiBi bias (B, H, K, K) or None."""
        return None

    # -- student and teacher inputs ----------------------------------------------------------
    def student_features(self, feats: Tensor, source: Tensor, padding_mask: Optional[Tensor], mask: Tensor) -> Tensor:
        """The student's local features (B, T, D): by default the shared ones; an encoder
        that corrupts its raw input instead (data2vec 1.0 text) embeds the corrupted input."""
        return feats

    def teacher_features(self, teacher: "ModalityEncoder", feats: Tensor, padding_mask: Optional[Tensor],
                         source: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The teacher's local features: by default the student's (a shared local encoder);
        an encoder whose teacher owns an EMA local encoder runs ``teacher`` on ``source``."""
        return feats, padding_mask

    def teacher_encoder(self, teacher: "ModalityEncoder") -> "ModalityEncoder":
        """The encoder whose positions and context stage the teacher runs: its own EMA copy,
        or (a teacher of the shared blocks only) the student encoder itself."""
        return teacher

    def teacher_copy(self) -> nn.Module:
        """A view of the parts the EMA teacher owns (``ema.teacher_view``); the teacher deep-copies it."""
        raise NotImplementedError

    # -- life cycle -----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """After BERT init of the whole model: the decoder projection gets PyTorch's default
        init, as the reference's speech and image encoders (text keeps BERT init: its override)."""
        if self.decoder is not None:
            for m in self.decoder.proj.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def remove_pretraining_modules(self) -> None:
        """Fine-tuning / extraction: drop what only pretraining needs."""
        self.decoder = None
