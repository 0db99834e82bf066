"""What the d2v tasks share: the teacher's EMA step after each optimizer update, progress
and ETA lines and a one-line Ctrl-C, the fine-tuning tasks' record of the pretrained
config, tasks without dictionaries."""
from __future__ import annotations

import atexit
import collections
import logging
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
from fairseq.logging import metrics
from omegaconf.errors import MissingMandatoryValue

from ..fairseq_utils import set_cfg_field, unwrap
from .run_config import RunConfig  # noqa: F401  (re-exported: the task configs' base)

logger = logging.getLogger(__name__)


class RunFeedbackMixin:
    """Every training run shows where it is: ``done_pct`` (updates done of ``max_update``)
    and ``eta_min`` (minutes left at the rate of the last 50 updates) join fairseq's
    meters, so they appear in each log line and in the tqdm bar's postfix (fairseq shows a
    bar when ``common.log_format`` is unset and the output is a terminal). Ctrl-C ends with
    one line: the update reached, the last checkpoint and the command that resumes from it.
    When the process ends, the first rank writes ``training_curves.png`` / ``.json`` of the
    lines it logged into the checkpoint folder (``d2v_plugin.plot``)."""

    _recent = None
    _update = 0
    _recorder = None

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        out = super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        if self._recent is None:
            self._recent = collections.deque(maxlen=50)
            install_interrupt_message(self)
            if not dist.is_initialized() or dist.get_rank() == 0:
                from ..plot import RunRecorder

                save_dir = save_dir_from_argv(sys.argv)
                self._recorder = RunRecorder().attach()
                atexit.register(self._recorder.write, save_dir, os.path.basename(os.path.normpath(save_dir)))
        if not self._recent or self._recent[-1][0] != update_num:
            self._recent.append((update_num, time.perf_counter()))
        self._update = update_num + 1
        total = getattr(self.cfg, "progress_total", 0)
        total = total if isinstance(total, int) else 0
        if total > 0:
            metrics.log_scalar("done_pct", 100.0 * self._update / total, weight=0, priority=1000, round=1)
        if len(self._recent) >= 2 and total > 0:
            (u0, t0), (u1, t1) = self._recent[0], self._recent[-1]
            if t1 > t0:
                metrics.log_scalar("eta_min", (total - self._update) * (t1 - t0) / (u1 - u0) / 60.0, weight=0,
                                   priority=1001, round=1)
        return out


def save_dir_from_argv(argv) -> str:
    """The checkpoint folder of this command line (``checkpoint.save_dir=`` or ``--save-dir``;
    fairseq's default ``checkpoints``)."""
    for i, a in enumerate(argv):
        if a.startswith("checkpoint.save_dir="):
            return a.split("=", 1)[1]
        if a.startswith("--save-dir="):
            return a.split("=", 1)[1]
        if a == "--save-dir" and i + 1 < len(argv):
            return argv[i + 1]
    return "checkpoints"


def interrupt_message(update: int, argv) -> str:
    last = os.path.join(save_dir_from_argv(argv), "checkpoint_last.pt")
    command = " ".join(shlex.quote(a) for a in [os.path.basename(argv[0]), *argv[1:]])
    if os.path.isfile(last):
        saved = time.strftime("%H:%M:%S", time.localtime(os.path.getmtime(last)))
        return (f"interrupted (Ctrl-C) during update {update + 1}; the last checkpoint is {last} (saved {saved}); "
                f"resume from it with the same command: {command}")
    return (f"interrupted (Ctrl-C) during update {update + 1}; no checkpoint saved yet ({last} does not exist), "
            f"so the same command starts afresh: {command}")


def install_interrupt_message(task) -> None:
    """SIGINT in the training process: print ``interrupt_message`` and exit 130 (no tracebacks
    from the trainer and its data workers). Checkpoint files are written atomically, so
    stopping at any point leaves the last complete checkpoint."""
    main_pid = os.getpid()

    def on_interrupt(signum, frame):
        if os.getpid() != main_pid:  # a forked data worker: let torch end it quietly
            raise KeyboardInterrupt
        print(interrupt_message(task._update, sys.argv), file=sys.stderr, flush=True)
        if task._recorder is not None:
            task._recorder.write(save_dir_from_argv(sys.argv), "interrupted")
        os._exit(130)

    try:
        signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread (an embedding application): keep its handler
        pass


class EMAStepMixin:
    """fairseq calls ``task.optimizer_step`` exactly once per update (after
    ``update_freq`` micro-batches, and never for an fp16-overflow update), so the
    teacher steps there rather than in ``set_num_updates``. With ``--amp`` fairseq calls it
    for non-finite gradients too and the grad scaler skips the update: the teacher is
    not stepped then either. In multi-process training the
    ranks' teachers are compared every ``ema_sync_check_interval`` updates."""

    def optimizer_step(self, optimizer, model, update_num):
        restore_masters(optimizer, unwrap(model))
        scaler = getattr(optimizer, "scaler", None)  # --amp: fairseq steps even when the scaler skips the update
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(optimizer, model, update_num)
        inner = unwrap(model)
        if scale is not None and scaler.get_scale() < scale:  # inf/NaN gradients: the student did not move
            logger.info("update %d: non-finite gradients, the AMP scaler skipped the step; the teacher is not stepped",
                        update_num + 1)
            return
        if hasattr(inner, "ema_step"):
            inner.ema_step(update_num + 1, fp32_masters(optimizer))
            interval = getattr(inner.cfg, "ema_sync_check_interval", 0)
            if interval > 0 and (update_num + 1) % interval == 0 and dist.is_initialized() and dist.get_world_size() > 1:
                check_teachers_agree(inner.teacher, update_num + 1)


def fp32_masters(optimizer) -> dict:
    """id(model parameter) -> its fp32 master copy, for fairseq's FP16Optimizer (``--fp16`` /
    ``--bf16``: the optimizer steps fp32 copies and casts them into the model), so the
    teacher averages the masters rather than their bf16/fp16 roundings. Empty for fp32
    training and for the memory-efficient optimizers, which keep no masters."""
    params, masters = getattr(optimizer, "fp16_params", None), getattr(optimizer, "fp32_params", None)
    if params is None or masters is None:
        return {}
    if isinstance(masters, dict):  # flattened (fp16 on CUDA): one flat fp32 tensor per device, in parameter order
        out, offset = {}, dict.fromkeys(masters, 0)
        for p in params:
            key = p.device.index if p.device.index in masters else next(iter(masters))
            n = p.numel()
            out[id(p)] = masters[key].data[offset[key] : offset[key] + n].view_as(p)
            offset[key] += n
        return out
    return {id(p): m.data for p, m in zip(params, masters)}


def restore_masters(optimizer, model) -> None:
    """After a resume, fairseq rebuilds the fp32 masters from the bf16/fp16 student (losing
    what rounding hid); put back the masters the checkpoint saved, before the first step."""
    saved = getattr(model, "restored_masters", None)
    if not saved:
        return
    masters = fp32_masters(optimizer)
    if masters:
        for name, p in model.named_parameters():
            if id(p) in masters and name in saved:
                masters[id(p)].copy_(saved[name])
        logger.info("restored %d fp32 master weights from the checkpoint", len(saved))
    model.restored_masters = {}


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


class LabelledAudioTaskMixin:
    """What the labelled speech tasks (CTC, audio classification) check once the model is
    built: the task normalises waveforms as the pretraining did, and files shorter than the
    feature extractor's receptive field are skipped (counted, logged)."""

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        normalize = getattr(unwrap(model), "pretrained_normalize", self.cfg.normalize)
        if normalize != self.cfg.normalize:
            raise ValueError(
                f"task.normalize={self.cfg.normalize} but the pretrained model was trained with normalize={normalize}; "
                f"set task.normalize={str(normalize).lower()}"
            )
        self.encoder = unwrap(model).encoder.modality_encoders["audio"]
        for split in self.datasets:
            self.check_lengths(split)
        return model

    def check_lengths(self, split: str):
        """Skip the files of ``split`` that yield no frame -> its dataset, or None before the
        model (or the split) exists."""
        from ..modules.feature_extractor import receptive_field

        enc, ds = getattr(self, "encoder", None), self.datasets.get(split)
        if enc is None or ds is None:
            return None
        field_ = receptive_field(enc.spec)
        ds._keep(ds.sizes >= field_, f"shorter than the feature extractor's receptive field ({field_} samples)",
                 "use longer recordings")
        return ds


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
