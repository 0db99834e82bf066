"""Small helpers for living inside fairseq, shared by the tasks, models and criterions."""
from __future__ import annotations

import torch.nn as nn
from omegaconf import DictConfig, open_dict


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / fairseq wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def set_cfg_field(cfg, name: str, value) -> None:
    """Set a field on a model/task config, a struct-mode DictConfig (fairseq) or a dataclass."""
    if isinstance(cfg, DictConfig):
        with open_dict(cfg):
            setattr(cfg, name, value)
    else:
        setattr(cfg, name, value)
