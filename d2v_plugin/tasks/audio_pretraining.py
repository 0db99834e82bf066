"""fairseq adapter: the ``d2v_audio_pretraining`` task (speech self-supervision)."""

import logging
import os
from dataclasses import dataclass, field

from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.audio import AudioDataError, AudioPretrainDataset
from ..fairseq_utils import unwrap
from ..modules.feature_extractor import receptive_field
from .base import EMAStepMixin, NoDictionaryTask, RunConfig, RunFeedbackMixin, WorkerMasksMixin, data_dir

logger = logging.getLogger(__name__)


@dataclass
class D2vAudioPretrainingConfig(RunConfig):
    data: str = field(default=MISSING, metadata={"help": "directory holding the {split}.tsv manifests"})
    sample_rate: int = field(default=16000, metadata={"help": "required sample rate (Hz) of every file"})
    normalize: bool = field(
        default=True, metadata={"help": "zero-mean unit-variance waveforms (required by layer_norm extractors)"}
    )
    max_sample_size: int = field(
        default=320000, metadata={"help": "longer files are randomly cropped to this many samples (20 s)"}
    )
    min_sample_size: int = field(
        default=32000, metadata={"help": "shorter files are skipped, counted and logged (2 s)"}
    )
    pad: bool = field(
        default=False,
        metadata={"help": "pad a batch to its longest file (with a padding mask) instead of cropping all to the shortest"},
    )
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of crops and masks (common.seed)"})


@register_task("d2v_audio_pretraining", dataclass=D2vAudioPretrainingConfig)
class D2vAudioPretrainingTask(RunFeedbackMixin, EMAStepMixin, WorkerMasksMixin, NoDictionaryTask, FairseqTask):
    """Reads wav2vec manifests; the collater crops and draws the model's masks in the
    data workers once the model is built."""

    cfg: D2vAudioPretrainingConfig

    @classmethod
    def setup_task(cls, cfg: D2vAudioPretrainingConfig, **kwargs):
        data_dir(cfg, "d2v_plugin.prep.audio_manifest (train.tsv, valid.tsv)")
        return cls(cfg)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        ds = AudioPretrainDataset(
            os.path.join(self.cfg.data, f"{split}.tsv"), self.cfg.sample_rate, self.cfg.max_sample_size,
            self.cfg.min_sample_size, self.cfg.normalize, self.cfg.pad, self.cfg.seed,
        )
        self.attach_masking(ds)
        self.datasets[split] = ds
        return ds

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if "audio" in getattr(model, "modality_encoders", {}):
            self.attach_model(model)
        return model

    def attach_model(self, model) -> None:
        """Check the model against the data settings and hand its masks to the datasets."""
        enc = unwrap(model).modality_encoders["audio"]
        field_ = receptive_field(enc.spec)
        if self.cfg.min_sample_size < field_:
            raise AudioDataError(
                f"task.min_sample_size={self.cfg.min_sample_size} is shorter than the feature extractor's "
                f"receptive field ({field_} samples); raise it to at least {field_}"
            )
        self.share_masking(enc.spec, enc.masking)
