"""fairseq adapter: the ``d2v_asr_finetuning`` task (CTC speech recognition) and its
best-path CTC generator for ``fairseq-generate``."""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from fairseq.data import Dictionary
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.audio import AudioDataError, LabelledAudioDataset
from ..fairseq_utils import unwrap
from ..modules.ctc import ctc_best_path
from ..modules.feature_extractor import conv_output_lengths, receptive_field
from .base import FinetuneTaskMixin, NoDictionaryTask, RunConfig, RunFeedbackMixin, data_dir

logger = logging.getLogger(__name__)


@dataclass
class D2vAsrFinetuningConfig(RunConfig):
    data: str = field(
        default=MISSING, metadata={"help": "directory with {split}.tsv manifests, {split}.{labels} and dict.{labels}.txt"}
    )
    labels: str = field(default="ltr", metadata={"help": "label file extension: {split}.ltr and dict.ltr.txt"})
    sample_rate: int = field(default=16000, metadata={"help": "required sample rate (Hz) of every file"})
    normalize: bool = field(
        default=True, metadata={"help": "zero-mean unit-variance waveforms; must match the pretrained model's setting"}
    )
    max_sample_size: int = field(
        default=480000, metadata={"help": "longer files are skipped, counted and logged (labelled audio is never cropped)"}
    )
    min_sample_size: int = field(default=0, metadata={"help": "shorter files are skipped, counted and logged"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the batch order (common.seed)"})


class CTCGenerator:
    """Best-path (greedy = Viterbi without a lexicon) CTC decoding in fairseq's hypothesis
    format: per utterance one hypothesis with tokens, score (path log-prob) and the
    log-prob of the frame emitting each token."""

    def __init__(self, dictionary: Dictionary):
        self.dictionary = dictionary
        self.blank = dictionary.bos()
        self.symbols_to_strip_from_output = {dictionary.bos(), dictionary.pad(), dictionary.eos()}

    @torch.no_grad()
    def generate(self, models, sample, **unused) -> List[List[Dict]]:
        if len(models) != 1:
            raise ValueError("CTC decoding takes one model (--path with a single checkpoint)")
        model = models[0]
        net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        hyps = ctc_best_path(lprobs, model.output_lengths(net_output), self.blank)
        return [[{"tokens": t, "score": s, "positional_scores": p, "alignment": None}] for t, p, s in hyps]


@register_task("d2v_asr_finetuning", dataclass=D2vAsrFinetuningConfig)
class D2vAsrFinetuningTask(RunFeedbackMixin, FinetuneTaskMixin, NoDictionaryTask, FairseqTask):
    cfg: D2vAsrFinetuningConfig

    def __init__(self, cfg: D2vAsrFinetuningConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.checked_optimizer = False

    @classmethod
    def setup_task(cls, cfg: D2vAsrFinetuningConfig, **kwargs):
        path = os.path.join(data_dir(cfg, "d2v_plugin.prep.audio_manifest + prep.asr_labels"), f"dict.{cfg.labels}.txt")
        if not os.path.isfile(path):
            raise AudioDataError(f"{path} not found; write the labels and dictionary with "
                                 "`python -m d2v_plugin.prep.asr_labels TRANSCRIPTS --manifest-dir DATA`")
        return cls(cfg, Dictionary.load(path))

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, task_cfg=None, **kwargs):
        data = self.cfg.data
        self.datasets[split] = LabelledAudioDataset(
            os.path.join(data, f"{split}.tsv"), os.path.join(data, f"{split}.{self.cfg.labels}"), self.dictionary,
            self.cfg.sample_rate, self.cfg.max_sample_size, self.cfg.min_sample_size, self.cfg.normalize, self.cfg.seed,
            shuffle=split == "train",
        )
        self.check_lengths(split)
        return self.datasets[split]

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        normalize = getattr(model, "pretrained_normalize", self.cfg.normalize)
        if normalize != self.cfg.normalize:
            raise ValueError(
                f"task.normalize={self.cfg.normalize} but the pretrained model was trained with normalize={normalize}; "
                f"set task.normalize={str(normalize).lower()}"
            )
        self.encoder = unwrap(model).encoder.modality_encoders["audio"]
        for split in self.datasets:
            self.check_lengths(split)
        return model

    def check_lengths(self, split: str) -> None:
        """Skip (counted, logged) files shorter than the extractor's receptive field, and
        count utterances with fewer frames than target units: CTC cannot align those
        (``zero_infinity`` zeroes their loss)."""
        enc = getattr(self, "encoder", None)
        ds = self.datasets.get(split)
        if enc is None or ds is None:
            return
        field_ = receptive_field(enc.spec)
        ds._keep(ds.sizes >= field_, f"shorter than the feature extractor's receptive field ({field_} samples)",
                 "use longer recordings")
        frames = conv_output_lengths(torch.from_numpy(ds.sizes), enc.spec)
        short = sum(int(f) < len(lab) for f, lab in zip(frames, ds.labels))
        if short:
            logger.warning("%s: %d of %d utterances have fewer frames than label units; CTC ignores them",
                           split, short, len(ds))

    def optimizer_step(self, optimizer, model, update_num):
        if not self.checked_optimizer:
            inner = optimizer
            for attr in ("fp32_optimizer", "wrapped_optimizer"):
                inner = getattr(inner, attr, inner)
            if unwrap(model).cfg.layer_decay < 1.0 and type(inner).__name__ != "FairseqCompositeOptimizer":
                raise ValueError("model.layer_decay < 1 needs optimizer._name=composite with dynamic_groups=true "
                                 "(see the README, per-layer learning rates); or set model.layer_decay=1")
            self.checked_optimizer = True
        super().optimizer_step(optimizer, model, update_num)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **unused):
        return CTCGenerator(self.target_dictionary)

    @property
    def target_dictionary(self):
        return self.dictionary
