"""The speech modality encoder (data2vec 1.0 §3.1 / data2vec 2.0 §3.2, "Speech").

waveform (B, L) --conv feature extractor--> (B, C, T) --LayerNorm, Linear--> (B, T, D)
"local features", shared by student and teacher. Then, per view:
  + convolutional positional encoding (computed on the full sequence; for the
    data2vec 2.0 student with masked frames zeroed, before masked frames are dropped)
  -> context: LayerNorm, dropout, ``prenet_depth`` blocks (with ALiBi if enabled).
data2vec 1.0 replaces masked frames with a learned ``mask_emb``; data2vec 2.0 drops
them and fills them back in for the ``decoder``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .decoder import ConvDecoder
from .ema import teacher_view
from .encoder import ModalityEncoder
from .feature_extractor import ConvFeatureExtractor, conv_output_lengths, frame_padding_mask, parse_conv_spec
from .masking import MaskSettings
from .positional import ConvPositionalEncoder, alibi_bias_1d, alibi_slopes
from .settings import Data2VecSettings
from .transformer import ContextEncoder


def scale_grad(x: Tensor, mult: float) -> Tensor:
    """Identity forward; gradient multiplied by ``mult``."""
    return x if mult == 1.0 else x * mult + x.detach() * (1.0 - mult)


def prepare_waveform(wav: Tensor, normalize: bool) -> Tensor:
    """A decoded mono waveform (L,) -> the model's input: zero mean, unit variance over time
    when ``normalize`` (what layer_norm feature extractors are trained on)."""
    return F.layer_norm(wav, wav.shape) if normalize else wav


class AudioEncoder(ModalityEncoder):
    modality = "audio"

    def __init__(self, s: Data2VecSettings, make_block):
        """s: the model settings (``s.audio`` and the shared ones); make_block(i, depth)
        builds one prenet block."""
        super().__init__()
        a = s.audio
        D = s.embed_dim
        self.spec = parse_conv_spec(a.conv_feature_layers)
        self.feature_extractor = ConvFeatureExtractor(self.spec, a.extractor_mode)
        self.project = nn.Sequential()
        self.project.add_module("norm", nn.LayerNorm(self.spec[-1].dim))
        self.project.add_module("linear", nn.Linear(self.spec[-1].dim, D))
        self.feature_grad_mult = a.feature_grad_mult
        self.pos_conv = ConvPositionalEncoder(D, a.conv_pos_width, a.conv_pos_depth, a.conv_pos_groups)
        prenet = nn.ModuleList(make_block(i, a.prenet_depth) for i in range(a.prenet_depth))
        self.context = ContextEncoder(D, s.norm_eps, a.prenet_dropout, prenet, s.layer_norm_first)
        self.use_alibi = a.use_alibi
        self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(s.num_heads)), persistent=False)
        self.alibi_scale = nn.Parameter(torch.ones(s.num_heads)) if a.use_alibi and a.alibi_learned_scale else None
        self.zero_padding, self.padding_aware = s.algorithm == "v1" or s.padding_aware, s.padding_aware
        # padded frames are zeroed before anything reads them and every frame is normalised on
        # its own: in eval mode (extraction, validation) each row's frames are computed from its
        # valid samples alone (exact; training batches are cropped to one length anyway)
        self.trim_padding = self.zero_padding and a.extractor_mode == "layer_norm"
        self.ema_copied = ("pos_conv",) if s.ema_copy_pos_conv else ()  # data2vec 1.0 copies, not averages
        self.masking = MaskSettings(a.mask_type, a.mask_prob, a.mask_length, a.mask_prob_adjust, s.clone_batch)
        self.mask_emb = nn.Parameter(torch.empty(D).uniform_()) if s.algorithm == "v1" else None
        self.decoder = ConvDecoder.from_settings(D, a.decoder) if s.algorithm == "v2" else None

    # -- shared by student and teacher -------------------------------------------------
    def local_features(self, source: Tensor, padding_mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """source: (B, L) waveform, padding_mask: (B, L) -> features (B, T, D), frame padding (B, T) | None."""
        frame_pad = frame_padding_mask(padding_mask, int(conv_output_lengths(torch.tensor([source.shape[1]]), self.spec)),
                                       self.spec)
        if frame_pad is None or not self.trim_padding or self.training:
            return self._frames(source), frame_pad
        # mixed lengths: each row's valid samples alone (no conv work on padding), zeros after them
        lengths, frames = (~padding_mask).sum(-1).tolist(), (~frame_pad).sum(-1).tolist()
        rows = [self._frames(source[i:i + 1, :n])[0, :t] for i, (n, t) in enumerate(zip(lengths, frames))]
        feats = rows[0].new_zeros(source.shape[0], frame_pad.shape[1], rows[0].shape[-1])
        for i, row in enumerate(rows):
            feats[i, :row.shape[0]] = row
        return feats, frame_pad

    def _frames(self, source: Tensor) -> Tensor:
        """(B, L) waveform -> (B, T, D) projected conv features."""
        if self.feature_grad_mult > 0:
            feats = scale_grad(self.feature_extractor(source), self.feature_grad_mult)
        else:
            with torch.no_grad():
                feats = self.feature_extractor(source)
        return self.project(feats.transpose(1, 2))  # (B, T, D)

    def add_positions(self, x: Tensor, padding_mask: Optional[Tensor], zero_mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, T, D) full sequence -> x + conv positions; frames in ``zero_mask`` (B, T)
        are zeroed in the positional encoder's input only (data2vec 2.0 student)."""
        if self.zero_padding and padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        inp = x if zero_mask is None else x.masked_fill(zero_mask.unsqueeze(-1), 0.0)
        return x + self.pos_conv(inp, padding_mask if self.padding_aware else None)

    def alibi(self, positions: Tensor) -> Optional[Tensor]:
        """positions: (B, K) time index of each token -> (B, H, K, K) bias or None."""
        if not self.use_alibi:
            return None
        return alibi_bias_1d(positions, self.alibi_slopes, self.alibi_scale)

    def teacher_copy(self) -> "AudioEncoder":
        """What the EMA teacher owns: positions, context, ALiBi scale (the feature
        extractor and projection are shared with the student; no decoder)."""
        return teacher_view(self, ("feature_extractor", "project", "decoder"), ("mask_emb",))

    def reset_parameters(self) -> None:
        self.project.linear.reset_parameters()  # PyTorch's default init, as the reference (before the decoder's)
        super().reset_parameters()
