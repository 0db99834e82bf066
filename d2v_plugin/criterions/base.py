"""What the d2v criteria share: every logged value is a plain sum over batches, so
fairseq combines them with ``all_reduce`` (which works on CPU/gloo, unlike its pickled
``all_gather`` path), and the loss is reported per unit of ``sample_size``."""
from typing import Callable, List

from fairseq import metrics
from fairseq.criterions import FairseqCriterion


class SummedLogsCriterion(FairseqCriterion):
    @staticmethod
    def log_loss(logging_outputs: List[dict], round: int) -> Callable[[str], float]:
        """Log ``loss`` / ``sample_size``; -> the summing function for the other keys."""
        def total(key: str) -> float:
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1), sample_size, round=round)
        return total

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
