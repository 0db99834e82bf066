"""fairseq adapter: the ``d2v_audio_classification`` task (one class per recording:
spoken commands, speakers, sounds) for fine-tuning and ``fairseq-validate``.

DATA holds ``{split}.tsv`` (wav2vec manifests), ``{split}.label`` (one class name per
manifest line) and ``labels.txt`` (the classes, one per line); ``python -m
d2v_plugin.samples commands`` writes an example. Metrics: the ``d2v_classification``
criterion's top-1 accuracy and macro F1.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import List

from fairseq.tasks import FairseqTask, register_task
from omegaconf import MISSING

from ..data.audio import AudioDataError, ClassifiedAudioDataset
from .base import FinetuneTaskMixin, LabelledAudioTaskMixin, NoDictionaryTask, RunFeedbackMixin, data_dir
from .run_config import LabelledAudioConfig

logger = logging.getLogger(__name__)


@dataclass
class D2vAudioClassificationConfig(LabelledAudioConfig):
    data: str = field(default=MISSING, metadata={"help": "directory with {split}.tsv, {split}.label and labels.txt"})


@register_task("d2v_audio_classification", dataclass=D2vAudioClassificationConfig)
class D2vAudioClassificationTask(RunFeedbackMixin, LabelledAudioTaskMixin, FinetuneTaskMixin, NoDictionaryTask, FairseqTask):
    cfg: D2vAudioClassificationConfig
    regression = False

    def __init__(self, cfg: D2vAudioClassificationConfig, labels: List[str]):
        super().__init__(cfg)
        self.labels = labels

    @classmethod
    def setup_task(cls, cfg: D2vAudioClassificationConfig, **kwargs):
        data = data_dir(cfg, "python -m d2v_plugin.samples commands (an example: {split}.tsv, {split}.label, labels.txt)")
        path = os.path.join(data, "labels.txt")
        if not os.path.isfile(path):
            raise AudioDataError(f"{path}: not found; list the classes there, one per line")
        with open(path, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise AudioDataError(f"{path}: {len(labels)} class(es){' with duplicates' if len(set(labels)) != len(labels) else ''}; "
                                 "classification needs two or more distinct classes")
        return cls(cfg, labels)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        c = self.cfg
        self.datasets[split] = ClassifiedAudioDataset(
            os.path.join(c.data, f"{split}.tsv"), os.path.join(c.data, f"{split}.label"), self.labels, c.sample_rate,
            c.max_sample_size, c.min_sample_size, c.normalize, c.seed, shuffle=split == "train")
        self.check_lengths(split)
        return self.datasets[split]
