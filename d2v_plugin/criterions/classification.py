"""fairseq adapter: the ``d2v_classification`` criterion — cross-entropy with label
smoothing and optional mixup / cutmix (images); logs top-1 (and top-5 with more than 5
classes; F1 and MCC with 2 classes; macro F1 with 3-64 classes). Regression tasks (``task.regression``): squared
error, logs Pearson's r (from sums) and, in single-process validation (``fairseq-validate``,
validation during one-process training), Spearman's rank correlation over the whole split.
Every other logged value is a sum, so distributed runs combine them."""

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging.meters import ConcatTensorMeter
from scipy.stats import rankdata

from .base import SummedLogsCriterion

MACRO_F1_MAX_CLASSES = 64  # up to this many classes, validation logs the macro F1 (per-class counts)


@dataclass
class D2vClassificationCriterionConfig(FairseqDataclass):
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the cross-entropy targets"})
    mixup_alpha: float = field(default=0.0, metadata={"help": "mixup Beta(alpha, alpha); 0 disables (reference: 0.8)"})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "cutmix Beta(alpha, alpha); 0 disables (reference: 1.0)"})
    mix_prob: float = field(default=1.0, metadata={"help": "probability of mixing a training batch"})


def cutmix_box(h: int, w: int, lam: float):
    """A box covering a (1 - lam) fraction of the image at a random centre, clipped;
    -> (top, bottom, left, right) and the lam of the area actually kept."""
    cut = float(np.sqrt(1.0 - lam))
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return top, bottom, left, right, 1.0 - (bottom - top) * (right - left) / (h * w)


@register_criterion("d2v_classification", dataclass=D2vClassificationCriterionConfig)
class D2vClassificationCriterion(SummedLogsCriterion):
    def __init__(self, cfg: D2vClassificationCriterionConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.num_classes = len(task.labels) or 1

    def mix(self, images, labels):
        """-> mixed images (B, C, H, W), soft targets (B, classes) (mixup or cutmix with the flipped batch)."""
        c = self.cfg
        use_cutmix = c.cutmix_alpha > 0 and (c.mixup_alpha <= 0 or float(torch.rand(())) < 0.5)
        alpha = c.cutmix_alpha if use_cutmix else c.mixup_alpha
        lam = float(np.random.beta(alpha, alpha))
        images = images.clone()
        if use_cutmix:
            top, bottom, left, right, lam = cutmix_box(images.shape[-2], images.shape[-1], lam)
            images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
        else:
            images = lam * images + (1.0 - lam) * images.flip(0)
        one_hot = F.one_hot(labels, self.num_classes).float()
        return images, lam * one_hot + (1.0 - lam) * one_hot.flip(0)

    def forward(self, model, sample, reduce=True):
        net_input, labels = dict(sample["net_input"]), sample["target"]
        B = len(labels)
        log = {"ntokens": B, "nsentences": B, "sample_size": B}
        if getattr(self.task, "regression", False):
            pred = model(**net_input)["logits"].float().squeeze(-1)
            y = labels.float()
            loss = F.mse_loss(pred, y, reduction="sum")
            p, t = pred.detach().double(), y.double()
            log.update(loss=loss.item(), n=B, sx=float(p.sum()), sy=float(t.sum()), sxx=float((p * p).sum()),
                       syy=float((t * t).sum()), sxy=float((p * t).sum()))
            if not model.training and not (dist.is_initialized() and dist.get_world_size() > 1):
                log.update(_pred=p.cpu(), _target=t.cpu())  # for Spearman (ranks need the whole split; not summable)
            return loss, B, log
        images = net_input["source"]
        mixing = (model.training and images.dim() == 4 and (self.cfg.mixup_alpha > 0 or self.cfg.cutmix_alpha > 0)
                  and float(torch.rand(())) < self.cfg.mix_prob)
        target = labels
        if mixing:
            net_input["source"], target = self.mix(images, labels)
        logits = model(**net_input)["logits"].float()
        loss = F.cross_entropy(logits, target, label_smoothing=self.cfg.label_smoothing, reduction="sum")
        log["loss"] = loss.item()
        if not mixing:
            top = logits.topk(min(5, self.num_classes), dim=-1).indices  # (B, k)
            hit = top == labels[:, None]
            log.update(counted=B, correct1=int(hit[:, 0].sum()), correct5=int(hit.any(1).sum()) if self.num_classes > 5 else 0)
            if self.num_classes == 2:
                p, t = top[:, 0] == 1, labels == 1
                log.update(tp=int((p & t).sum()), fp=int((p & ~t).sum()), fn=int((~p & t).sum()), tn=int((~p & ~t).sum()))
            elif self.num_classes <= MACRO_F1_MAX_CLASSES:  # per-class counts (sums) for the macro F1
                pred = top[:, 0]
                for c in range(self.num_classes):
                    p, t = pred == c, labels == c
                    log.update({f"tp{c}": int((p & t).sum()), f"fp{c}": int((p & ~t).sum()), f"fn{c}": int((~p & t).sum())})
        return loss, B, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        total = SummedLogsCriterion.log_loss(logging_outputs, round=4)
        metrics.log_scalar("nsentences", total("nsentences"))
        counted = total("counted")
        if counted:
            metrics.log_scalar("top1", 100.0 * total("correct1") / counted, counted, round=2)
            if total("correct5"):
                metrics.log_scalar("top5", 100.0 * total("correct5") / counted, counted, round=2)
        # F1 and MCC are not means over batches: their counts are summed over the split (or log
        # interval) and the scores derived from the sums
        keys = [k for k in ("tp", "fp", "fn", "tn") if any(k in log for log in logging_outputs)]
        keys += [f"{k}{c}" for c in range(MACRO_F1_MAX_CLASSES) for k in ("tp", "fp", "fn")
                 if any(f"tp{c}" in log for log in logging_outputs)]
        for k in keys:
            metrics.log_scalar_sum("_" + k, total(k))
        if "tp" in keys:
            metrics.log_derived("f1", lambda m: round(100.0 * f1_score(*(m[f"_{k}"].sum for k in ("tp", "fp", "fn"))), 2))
            metrics.log_derived("mcc", lambda m: round(100.0 * matthews(*(m[f"_{k}"].sum for k in ("tp", "fp", "fn", "tn"))), 2))
        elif keys:  # macro F1: the unweighted mean over the classes (one never seen nor predicted counts 0)
            n_classes = len(keys) // 3
            metrics.log_derived("f1", lambda m: round(100.0 * sum(
                f1_score(*(m[f"_{k}{c}"].sum for k in ("tp", "fp", "fn"))) for c in range(n_classes)) / n_classes, 2))
        n = total("n")
        if n:
            metrics.log_scalar("pearson", 100.0 * pearson(n, *(total(k) for k in ("sx", "sy", "sxx", "syy", "sxy"))), n, round=2)
        preds = [log["_pred"] for log in logging_outputs if "_pred" in log]
        if preds:
            metrics.log_custom(ConcatTensorMeter, "_pred", torch.cat(preds))
            metrics.log_custom(ConcatTensorMeter, "_target", torch.cat([log["_target"] for log in logging_outputs]))
            metrics.log_derived("spearman", lambda m: round(100.0 * spearman(m["_pred"].tensor, m["_target"].tensor), 2))


def f1_score(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(tp: int, fp: int, fn: int, tn: int) -> float:
    denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float:
    cov, vx, vy = sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else 0.0


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (ties get their average rank)."""
    rx, ry = rankdata(np.asarray(x, dtype=np.float64)), rankdata(np.asarray(y, dtype=np.float64))
    n = len(rx)
    return pearson(n, rx.sum(), ry.sum(), (rx * rx).sum(), (ry * ry).sum(), (rx * ry).sum()) if n > 1 else 0.0
