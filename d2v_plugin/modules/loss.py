"""Regression loss and collapse diagnostics (data2vec 1.0 §3.3 "Objective").

loss = scale * sum over masked positions and channels of l(prediction - target),
l = squared error (L2) or Smooth-L1 with ``beta``; scale defaults to 1/sqrt(D).
The caller divides by the number of masked positions (fairseq's ``sample_size``).

``prediction/target variance`` is the mean over channels of the per-channel standard
deviation across masked positions; a collapsed model (all targets equal) drives it
to zero. It is all-reduced across workers on the tensor's own device (so gloo/CPU
works too).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("l2", "smooth_l1")


def regression_loss(pred: Tensor, target: Tensor, kind: str = "l2", beta: float = 1.0, scale: Optional[float] = None) -> Tensor:
    """pred, target: (N, D) -> elementwise loss (N, D) in fp32, times scale (default 1/sqrt(D))."""
    pred, target = pred.float(), target.float()
    if kind == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif kind == "smooth_l1":
        loss = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    return loss * (scale if scale is not None else 1.0 / math.sqrt(pred.shape[-1]))


@torch.no_grad()
def channel_std(x: Tensor) -> Tensor:
    """x: (N, D) -> scalar mean over D of sqrt(unbiased var over N + 1e-6), across workers."""
    x = x.float().reshape(-1, x.shape[-1])
    n = torch.tensor(float(x.shape[0]), device=x.device)
    s, ss = x.sum(0), (x * x).sum(0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stats = torch.cat([n[None], s, ss])
        dist.all_reduce(stats)
        n, s, ss = stats[0], stats[1 : 1 + x.shape[1]], stats[1 + x.shape[1] :]
    var = (ss - s * s / n) / (n - 1).clamp_min(1.0)
    return torch.sqrt(var.clamp_min(0) + 1e-6).mean()


class CollapseError(RuntimeError):
    """Training stopped because targets or predictions lost their variance."""


class CollapseMonitor:
    """Raise ``CollapseError`` once target/prediction std stayed below the thresholds
    for ``patience`` consecutive checked updates, from ``start_update`` on."""

    def __init__(self, min_target_std: float, min_pred_std: float, start_update: int, patience: int):
        self.min_target_std, self.min_pred_std = min_target_std, min_pred_std
        self.start_update, self.patience = start_update, max(1, patience)
        self.strikes = 0

    def check(self, update: int, target_std: float, pred_std: float) -> None:
        if update < self.start_update:
            return
        low = target_std < self.min_target_std or pred_std < self.min_pred_std
        self.strikes = self.strikes + 1 if low else 0
        if self.strikes >= self.patience:
            raise CollapseError(
                f"representation collapse at update {update}: target_var={target_std:.4g} "
                f"(min {self.min_target_std}), pred_var={pred_std:.4g} (min {self.min_pred_std}) for "
                f"{self.strikes} consecutive updates. Lower the learning rate, raise ema_decay or the "
                "masking ratio, or relax min_target_var/min_pred_var (0 disables the check)."
            )
