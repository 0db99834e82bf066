"""fairseq adapter: the ``d2v_ctc`` criterion — CTC loss; validation also decodes
(best path) and logs unit and word error rates ``uer`` / ``wer``."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass

from ..data.letters import errors, letters_to_words
from ..modules.ctc import ctc_best_path
from .base import SummedLogsCriterion

COUNTS = ("c_errors", "c_total", "w_errors", "w_total")


@dataclass
class D2vCtcCriterionConfig(FairseqDataclass):
    sentence_avg: bool = field(
        default=True, metadata={"help": "normalise the loss by utterances (else by target tokens)"}
    )
    zero_infinity: bool = field(
        default=True, metadata={"help": "zero the loss of utterances too short for their transcript"}
    )


@register_criterion("d2v_ctc", dataclass=D2vCtcCriterionConfig)
class D2vCtcCriterion(SummedLogsCriterion):
    """The CTC blank is the dictionary's ``<s>`` (index 0), as in wav2vec 2.0 / data2vec."""

    def __init__(self, cfg: D2vCtcCriterionConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.dictionary = task.target_dictionary
        self.blank = self.dictionary.bos()

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)  # (B, T, V) fp32
        frames = model.output_lengths(net_output)
        targets, target_lengths = sample["target"], sample["target_lengths"]
        with torch.backends.cudnn.flags(enabled=False):
            loss = F.ctc_loss(
                lprobs.transpose(0, 1), targets, frames, target_lengths, blank=self.blank, reduction="sum",
                zero_infinity=self.cfg.zero_infinity,
            )
        ntokens = int(target_lengths.sum())
        nsentences = len(target_lengths)
        sample_size = nsentences if self.cfg.sentence_avg else ntokens
        log = {"loss": loss.item(), "ntokens": ntokens, "nsentences": nsentences, "sample_size": sample_size}
        if not model.training:
            log.update(self.error_counts(lprobs, frames, targets, target_lengths))
        return loss, sample_size, log

    def error_counts(self, lprobs, frames, targets, target_lengths):
        counts = dict.fromkeys(COUNTS, 0)
        for (hyp, _, _), ref, n in zip(ctc_best_path(lprobs, frames, self.blank), targets, target_lengths.tolist()):
            ref = ref[:n].tolist()
            c = errors(ref, hyp.tolist())
            w = errors(letters_to_words(self.dictionary.string(ref)).split(),
                       letters_to_words(self.dictionary.string(hyp)).split())
            for k, v in zip(COUNTS, c + w):
                counts[k] += v
        return counts

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        total = SummedLogsCriterion.log_loss(logging_outputs, round=3)
        metrics.log_scalar("ntokens", total("ntokens"))
        metrics.log_scalar("nsentences", total("nsentences"))
        for k in COUNTS:
            metrics.log_scalar(f"_{k}", total(k))
        if total("c_total") > 0:
            metrics.log_derived("uer", lambda m: round(100 * m["_c_errors"].sum / max(m["_c_total"].sum, 1), 3))
            metrics.log_derived("wer", lambda m: round(100 * m["_w_errors"].sum / max(m["_w_total"].sum, 1), 3))
