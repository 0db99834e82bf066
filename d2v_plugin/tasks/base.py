"""What the d2v tasks share: the teacher's EMA step after each optimizer update, the
fine-tuning tasks' record of the pretrained config, tasks without dictionaries."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from omegaconf.errors import MissingMandatoryValue

from ..fairseq_utils import set_cfg_field, unwrap

logger = logging.getLogger(__name__)


class EMAStepMixin:
    """fairseq calls ``task.optimizer_step`` exactly once per update (after
    ``update_freq`` micro-batches, and never for an fp16-overflow update), so the
    teacher steps there rather than in ``set_num_updates``. With ``--amp`` fairseq calls it
    for non-finite gradients too and the grad scaler skips the update: the teacher is
    not stepped then either. In multi-process training the
    ranks' teachers are compared every ``ema_sync_check_interval`` updates."""

    def optimizer_step(self, optimizer, model, update_num):
        scaler = getattr(optimizer, "scaler", None)  # --amp: fairseq steps even when the scaler skips the update
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(optimizer, model, update_num)
        inner = unwrap(model)
        if scale is not None and scaler.get_scale() < scale:  # inf/NaN gradients: the student did not move
            logger.info("update %d: non-finite gradients, the AMP scaler skipped the step; the teacher is not stepped",
                        update_num + 1)
            return
        if hasattr(inner, "ema_step"):
            inner.ema_step(update_num + 1)
            interval = getattr(inner.cfg, "ema_sync_check_interval", 0)
            if interval > 0 and (update_num + 1) % interval == 0 and dist.is_initialized() and dist.get_world_size() > 1:
                check_teachers_agree(inner.teacher, update_num + 1)


def check_teachers_agree(teacher, update: int) -> None:
    """All-reduce the teacher's fingerprint (max and min over ranks); any difference stops the run."""
    if teacher is None:
        return
    fp = teacher.fingerprint()
    device = next(teacher.parameters()).device if dist.get_backend() != "gloo" else torch.device("cpu")
    hi, lo = fp.to(device), -fp.to(device)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    spread = float((hi + lo).abs().max())  # max - min over ranks
    if spread > 0:
        raise RuntimeError(f"update {update}: the EMA teachers differ across the {dist.get_world_size()} ranks "
                           f"(largest spread of a per-tensor sum {spread:.3g}); the ranks' students were not kept in sync")
    logger.info("update %d: the teacher is identical on all %d ranks", update, dist.get_world_size())


class WorkerMasksMixin:
    """Pretraining tasks draw the model's masks in the data workers: once the model is
    built, its mask settings go to every dataset loaded so far and to later ones."""

    masking: tuple = ()

    def share_masking(self, *settings) -> None:
        """settings: the arguments of the datasets' ``set_masking``."""
        self.masking = settings
        for ds in self.datasets.values():
            ds.set_masking(*settings)

    def attach_masking(self, ds) -> None:
        if self.masking:
            ds.set_masking(*self.masking)


class FinetuneTaskMixin:
    """fairseq builds a model from a merged copy of ``cfg.model``; the pretrained config the
    fine-tuning model recorded on its copy is stored again in the node the task was given,
    the one fairseq saves with checkpoints, so reloads never need the pretraining file."""

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if getattr(cfg, "pretrained_args", None) is None:
            set_cfg_field(cfg, "pretrained_args", unwrap(model).cfg.pretrained_args)
        return model


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


def data_dir(cfg, made_by: str) -> str:
    """``cfg.data``, or an error naming the setting and the fix when it is unset or not a folder."""
    try:
        data = cfg.data
    except MissingMandatoryValue:
        data = None
    if not data or data == "???":
        raise ValueError(f"task.data is not set: give the data folder (fairseq-hydra-train: task.data=DIR; fairseq-train: "
                         f"its first argument); {made_by} makes it")
    if not os.path.isdir(data):
        raise ValueError(f"task.data={data!r} is not a directory; point it at the folder {made_by} made")
    return data
