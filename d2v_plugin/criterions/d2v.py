"""fairseq adapter: the ``d2v`` criterion — sums the model's losses, logs diagnostics
(per modality too, for a multimodal model: ``audio_loss``, ``image_target_var``, ...)."""

from dataclasses import dataclass

from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass

from ..fairseq_utils import unwrap
from .base import SummedLogsCriterion

# logged per batch and averaged over batches (all summable, so distributed CPU/gloo works)
MEAN_KEYS = ("target_var", "pred_var", "masked_pct", "ema_decay")
MODALITY_KEYS = ("target_var", "pred_var")  # also per modality in multimodal training


@dataclass
class D2vCriterionConfig(FairseqDataclass):
    pass


@register_criterion("d2v", dataclass=D2vCriterionConfig)
class D2vCriterion(SummedLogsCriterion):
    """loss = sum of ``net_output["losses"]``; gradients are divided by
    ``sample_size`` = number of masked positions (regression targets)."""

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        loss = sum(out["losses"].values())
        sample_size = out["sample_size"]
        log = {
            "loss": loss.detach().item(),
            "sample_size": sample_size,
            "nsentences": sample["net_input"]["source"].size(0),
            "ntokens": sample_size,
            "batches": 1,
        }
        for k in MEAN_KEYS:
            log[k] = float(out[k])
        names = list(getattr(unwrap(model), "modality_encoders", {}))
        if len(names) > 1:  # every rank logs every key (zeros for the other modalities): summable across ranks
            this = sample["net_input"].get("modality")
            for m in names:
                on = m == this
                log.update({f"{m}_batches": int(on), f"{m}_loss": log["loss"] if on else 0.0,
                            f"{m}_sample_size": sample_size if on else 0})
                log.update({f"{m}_{k}": log[k] if on else 0.0 for k in MODALITY_KEYS})
        return loss, sample_size, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        total = SummedLogsCriterion.log_loss(logging_outputs, round=4)
        sample_size, batches = total("sample_size"), max(total("batches"), 1)
        metrics.log_scalar("sample_size", sample_size)
        for k in MEAN_KEYS:
            value = total(k) / batches
            metrics.log_scalar(k, value, batches, round=6 if k == "ema_decay" else 5)  # the decay as it is (0.999134)
        names = {k[: -len("_batches")] for log in logging_outputs for k in log if k.endswith("_batches") and k != "batches"}
        for m in sorted(names):
            n = total(f"{m}_batches")
            if n:
                metrics.log_scalar(f"{m}_loss", total(f"{m}_loss") / max(total(f"{m}_sample_size"), 1), n, round=4)
                for k in MODALITY_KEYS:
                    metrics.log_scalar(f"{m}_{k}", total(f"{m}_{k}") / n, n, round=5)

