"""fairseq adapter: the ``d2v_multimodal_pretraining`` task — one model, several modalities.

Builds the speech, image and text pretraining tasks for the modalities that have data,
mixes their datasets by ratio (every batch from one modality; ``MultiModalityDataset``),
and trains one ``d2v_multi`` model whose modality encoders feed one shared Transformer.
"""
import logging
from dataclasses import dataclass, field

from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from ..data.multimodal import MultiModalityDataset
from ..fairseq_utils import unwrap
from .audio_pretraining import D2vAudioPretrainingConfig, D2vAudioPretrainingTask
from .base import EMAStepMixin, NoDictionaryTask, RunConfig, RunFeedbackMixin
from .image import D2vImagePretrainingTask, D2vImageTaskConfig
from .text import BREAK_MODE, D2vTextPretrainingConfig, D2vTextPretrainingTask

logger = logging.getLogger(__name__)
MODALITIES = ("audio", "image", "text")


@dataclass
class D2vMultimodalPretrainingConfig(RunConfig):
    audio_data: str = field(default="", metadata={"help": "speech manifests (d2v_plugin.prep.audio_manifest); empty = no speech"})
    image_data: str = field(default="", metadata={"help": "image lists (d2v_plugin.prep.image_folder); empty = no images"})
    text_data: str = field(default="", metadata={"help": "binarised text (d2v_plugin.prep.text); empty = no text"})
    audio_ratio: float = field(default=1.0, metadata={"help": "share of speech batches (relative to the other ratios)"})
    image_ratio: float = field(default=1.0, metadata={"help": "share of image batches"})
    text_ratio: float = field(default=1.0, metadata={"help": "share of text batches"})
    audio_batch_size: int = field(default=0, metadata={"help": "utterances per speech batch (0: dataset.batch_size)"})
    image_batch_size: int = field(default=0, metadata={"help": "images per image batch (0: dataset.batch_size)"})
    text_batch_size: int = field(default=0, metadata={"help": "blocks per text batch (0: dataset.batch_size)"})
    audio_max_sample_size: int = field(default=320000, metadata={"help": "longer files are randomly cropped (samples)"})
    audio_min_sample_size: int = field(default=32000, metadata={"help": "shorter files are skipped, counted, logged"})
    audio_normalize: bool = field(default=True, metadata={"help": "zero-mean unit-variance waveforms"})
    image_input_size: int = field(default=224, metadata={"help": "image crop side in pixels (the model's image size)"})
    text_tokens_per_sample: int = field(default=512, metadata={"help": "tokens per text block, <s> included"})
    text_sample_break_mode: BREAK_MODE = field(default="none", metadata={"help": "text blocks: none, complete, complete_doc, eos"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the batch mix, crops and masks (common.seed)"})
    train_subset: str = field(default=II("dataset.train_subset"), metadata={"help": "the training split (augmented)"})


@register_task("d2v_multimodal_pretraining", dataclass=D2vMultimodalPretrainingConfig)
class D2vMultimodalPretrainingTask(RunFeedbackMixin, EMAStepMixin, NoDictionaryTask, FairseqTask):
    def __init__(self, cfg: D2vMultimodalPretrainingConfig, tasks):
        super().__init__(cfg)
        self.tasks = tasks  # modality -> its single-modality pretraining task

    @classmethod
    def setup_task(cls, cfg: D2vMultimodalPretrainingConfig, **kwargs):
        tasks = {}
        if cfg.audio_data:
            tasks["audio"] = D2vAudioPretrainingTask.setup_task(D2vAudioPretrainingConfig(
                data=cfg.audio_data, max_sample_size=cfg.audio_max_sample_size, min_sample_size=cfg.audio_min_sample_size,
                normalize=cfg.audio_normalize, seed=cfg.seed))
        if cfg.image_data:
            tasks["image"] = D2vImagePretrainingTask.setup_task(D2vImageTaskConfig(
                data=cfg.image_data, input_size=cfg.image_input_size, seed=cfg.seed, train_subset=cfg.train_subset))
        if cfg.text_data:
            tasks["text"] = D2vTextPretrainingTask.setup_task(D2vTextPretrainingConfig(
                data=cfg.text_data, tokens_per_sample=cfg.text_tokens_per_sample,
                sample_break_mode=cfg.text_sample_break_mode, seed=cfg.seed))
        if not tasks:
            raise ValueError("d2v_multimodal_pretraining has no data: set task.audio_data, task.image_data and/or task.text_data")
        return cls(cfg, tasks)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        datasets = {m: t.load_dataset(split, epoch, combine) for m, t in self.tasks.items()}
        get = lambda kind: {m: getattr(self.cfg, f"{m}_{kind}") for m in datasets}  # noqa: E731
        self.datasets[split] = MultiModalityDataset(datasets, get("ratio"), get("batch_size"), self.cfg.seed)
        return self.datasets[split]

    def build_model(self, cfg, from_checkpoint=False):
        if "text" in self.tasks:
            self.tasks["text"].configure_model(cfg)
        model = super().build_model(cfg, from_checkpoint)
        have = set(unwrap(model).modality_encoders)
        missing = [m for m in self.tasks if m not in have]
        if missing:
            raise ValueError(f"task data for {', '.join(missing)} but model.modalities={cfg.modalities!r}; add them")
        for t in self.tasks.values():
            t.attach_model(model)
        return model

    def state_dict(self):
        """The text vocabulary (sentencepiece model, dictionary) travels with the checkpoint."""
        return self.tasks["text"].state_dict() if "text" in self.tasks else {}

    def load_state_dict(self, state_dict):
        if "text" in self.tasks:
            self.tasks["text"].load_state_dict(state_dict)
