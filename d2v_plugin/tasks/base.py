"""What every d2v task shares: the teacher's EMA step after each optimizer update."""
from __future__ import annotations

import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / fairseq wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class EMAStepMixin:
    """fairseq calls ``task.optimizer_step`` exactly once per update (after
    ``update_freq`` micro-batches, and never for an fp16-overflow update), so the
    teacher steps there rather than in ``set_num_updates``."""

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        inner = unwrap(model)
        if hasattr(inner, "ema_step"):
            inner.ema_step(update_num + 1)


class NoDictionaryTask:
    """Tasks whose inputs are not token ids: no dictionaries, no length limit."""

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
