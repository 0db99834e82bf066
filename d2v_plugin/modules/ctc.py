"""CTC fine-tuning pieces (data2vec 1.0 §4.1 / data2vec 2.0 §4.1, "Speech processing"):
wav2vec 2.0-style masking of the full sequence, and best-path CTC decoding."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .masking import span_mask_1d


def finetune_mask(
    feats: Tensor,
    padding_mask: Optional[Tensor],
    time_prob: float,
    time_length: int,
    channel_prob: float,
    channel_length: int,
    mask_emb: Optional[Tensor],
    noise_std: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """feats: (B, T, D) local features -> feats with time spans replaced (by ``mask_emb``,
    or N(0, noise_std) for encoders without one) and channel spans zeroed at every step.
    Nothing is masked in padding; the token count is unchanged (unlike pretraining v2)."""
    B, T, D = feats.shape
    if time_prob > 0:
        lengths = torch.full((B,), T) if padding_mask is None else (~padding_mask).sum(1).cpu()
        mask = span_mask_1d(lengths, T, time_prob, time_length, min_masks=2, generator=generator).to(feats.device)
        fill = mask_emb.to(feats.dtype) if mask_emb is not None else torch.randn_like(feats) * noise_std
        feats = torch.where(mask.unsqueeze(-1), fill, feats)
    if channel_prob > 0:
        channels = span_mask_1d(torch.full((B,), D), D, channel_prob, channel_length, min_masks=0, generator=generator)
        feats = feats.masked_fill(channels.to(feats.device).unsqueeze(1), 0.0)
    return feats


def emitting_frames(path: Tensor, blank: int) -> Tensor:
    """path: (T,) frame labels -> (T,) bool, True where a frame emits a token: the first of
    a run of equal labels, unless it is the blank (CTC's collapse)."""
    new = torch.ones_like(path, dtype=torch.bool)
    new[1:] = path[1:] != path[:-1]
    return new & (path != blank)


def ctc_best_path(lprobs: Tensor, lengths: Tensor, blank: int) -> List[Tuple[Tensor, Tensor, float]]:
    """lprobs: (B, T, V) log-probabilities, lengths: (B,) valid frames ->
    per sample (tokens (S,), log-prob of the frame that emitted each token (S,), path score):
    the most probable frame labels with repeats merged and blanks removed."""
    best, labels = lprobs.detach().float().max(-1)  # (B, T)
    out = []
    for b, n in enumerate(lengths.tolist()):
        path, scores = labels[b, :n], best[b, :n]
        emit = emitting_frames(path, blank)
        out.append((path[emit], scores[emit], float(scores.sum())))
    return out
