"""The EMA teacher (data2vec 1.0 §3.3 "Teacher parameterization").

teacher <- tau * teacher + (1 - tau) * student after every optimizer update, with tau
annealed linearly from tau0 to tau_e over tau_n updates and constant afterwards.

The teacher is an ``nn.Module`` so ``.to(device)`` moves it, but it keeps fp32
master weights whatever dtype the student is cast to (``.half()`` / ``.bfloat16()``),
has no trainable parameters (so fairseq never puts it in the optimizer) and always
runs in eval mode. Parameters the student does not train (frozen tables) and
buffers are copied, not averaged; so are parameters whose names start with one of
``copy_prefixes`` (data2vec 1.0 speech copies its positional convolution).
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn


def teacher_view(module: nn.Module, drop_modules: Iterable[str] = (), drop_params: Iterable[str] = ()) -> nn.Module:
    """A shallow copy of ``module`` sharing its sub-modules and parameters, minus the
    named ones: what a modality encoder hands to the teacher (which deep-copies it)."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    twin._parameters = dict(module._parameters)
    for name in drop_modules:
        twin._modules[name] = None
    for name in drop_params:  # a plain None attribute: a None *parameter* entry would look shared to
        twin._parameters.pop(name, None)  # fairseq's trainer ("detected shared parameter" lines)
        twin.__dict__[name] = None
    return twin


def ema_decay_at(update: int, start: float, end: float, anneal_updates: int) -> float:
    """tau after ``update`` optimizer updates: linear start -> end over anneal_updates."""
    if update >= anneal_updates or start == end:
        return end
    return end - (end - start) * (1 - update / anneal_updates)


class EMATeacher(nn.Module):
    def __init__(self, parts: Dict[str, nn.Module], copy_prefixes: Tuple[str, ...] = ()):
        """parts: name -> student sub-module; the teacher holds a deep copy of each under
        the same name, so teacher and student parameter names coincide."""
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, copy.deepcopy(module))
        for p in self.parameters():
            p.requires_grad_(False)
        self.copy_prefixes = tuple(copy_prefixes)
        self.float()
        super().train(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        return super().train(False)  # the teacher never uses dropout or layerdrop

    def _apply(self, fn, recurse=True):
        """Follow device moves, but keep floating point tensors in fp32."""
        super()._apply(fn, recurse)
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self

    def _pairs(self, student: nn.Module) -> Iterable[Tuple[str, torch.Tensor, torch.Tensor]]:
        named = dict(student.named_parameters())
        named.update(student.named_buffers())
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            if name not in named:
                raise KeyError(f"teacher tensor {name!r} has no student counterpart")
            yield name, t, named[name]

    @torch.no_grad()
    def step(self, student: nn.Module, decay: float, masters: Optional[Dict[int, torch.Tensor]] = None) -> None:
        """One EMA update towards ``student`` (same parameter names), in fp32. ``masters``:
        id(student parameter) -> its fp32 master copy, read instead of the parameter when a
        mixed-precision optimizer trains masters and casts them into a bf16/fp16 student."""
        lr = 1.0 - decay  # the reference's op order, kept for bit-exact parity
        avg_t, avg_s = [], []
        buffer_names = {n for n, _ in self.named_buffers()}
        masters = masters or {}
        for name, t, s in self._pairs(student):
            copied = name in buffer_names or not s.requires_grad or name.startswith(self.copy_prefixes)
            s = masters.get(id(s), s)
            if copied:
                t.copy_(s)
            else:
                avg_t.append(t)
                avg_s.append(s.detach().to(device=t.device, dtype=torch.float32))
        if avg_t:
            torch._foreach_mul_(avg_t, 1.0 - lr)
            torch._foreach_add_(avg_t, avg_s, alpha=lr)

    @torch.no_grad()
    def fingerprint(self) -> torch.Tensor:
        """(n_tensors, 2) float64: sum and sum of squares of every teacher tensor — equal on
        every rank of a distributed run when the teachers are equal."""
        tensors = list(self.parameters()) + [b for b in self.buffers() if b.is_floating_point()]
        return torch.stack([torch.stack([t.double().sum(), t.double().pow(2).sum()]) for t in tensors])
