"""fairseq adapter: the ``d2v_image_pretraining`` and ``d2v_image_classification`` tasks.

Both read the split lists of ``d2v_plugin.prep.image_folder`` (``{split}.tsv`` and, for
classification, ``labels.txt``). Batches are formed by ``dataset.batch_size`` (every
image counts as one token).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import List

from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.image import ImageDataError, ImageDataset
from ..fairseq_utils import unwrap
from .base import EMAStepMixin, FinetuneTaskMixin, NoDictionaryTask, RunConfig, RunFeedbackMixin, WorkerMasksMixin, data_dir

logger = logging.getLogger(__name__)


@dataclass
class D2vImageTaskConfig(RunConfig):
    data: str = field(default=MISSING, metadata={"help": "directory with the {split}.tsv image lists (and labels.txt)"})
    input_size: int = field(default=224, metadata={"help": "crop side in pixels; must match the model's image size"})
    min_crop_scale: float = field(
        default=0.2, metadata={"help": "random resized crop: smallest area fraction (pretraining 0.2, fine-tuning 0.08)"}
    )
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of crops, flips and masks (common.seed)"})
    train_subset: str = field(
        default=II("dataset.train_subset"), metadata={"help": "the training split (augmented); others are centre-cropped"}
    )


def image_encoder(model):
    inner = unwrap(model)
    return (inner.modality_encoders if hasattr(inner, "modality_encoders") else inner.encoder.modality_encoders)["image"]


class ImageTask(RunFeedbackMixin, WorkerMasksMixin, NoDictionaryTask, FairseqTask):
    labels: List[str] = None

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        ds = ImageDataset(os.path.join(self.cfg.data, f"{split}.tsv"), self.cfg.input_size, train=split == self.cfg.train_subset,
                          seed=self.cfg.seed, labels=self.labels, min_crop_scale=self.cfg.min_crop_scale)
        self.datasets[split] = ds
        self.attach_masking(ds)
        return ds

    def check_size(self, model) -> None:
        enc = image_encoder(model)
        side = enc.grid[0] * enc.patch_embed.patch
        if side != self.cfg.input_size:
            raise ImageDataError(f"task.input_size={self.cfg.input_size} but the model takes {side}x{side} images; "
                                 f"set task.input_size={side} (or the model's image size)")


@register_task("d2v_image_pretraining", dataclass=D2vImageTaskConfig)
class D2vImagePretrainingTask(EMAStepMixin, ImageTask):
    """Image folders for data2vec pretraining; masks are drawn in the data workers."""

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        data_dir(cfg, "d2v_plugin.prep.image_folder (train.tsv, valid.tsv)")
        return cls(cfg)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.attach_model(model)
        return model

    def attach_model(self, model) -> None:
        """Check the model against the data settings and hand its masks to the datasets."""
        if "image" not in getattr(unwrap(model), "modality_encoders", {}):
            raise ValueError("d2v_image_pretraining needs a model with an image encoder (model.modalities=image)")
        self.check_size(model)
        self.share_masking(image_encoder(model).masking)


@register_task("d2v_image_classification", dataclass=D2vImageTaskConfig)
class D2vImageClassificationTask(FinetuneTaskMixin, ImageTask):
    """Labelled image folders (class sub-folders, labels.txt) for fine-tuning and ``fairseq-validate``."""

    def __init__(self, cfg, labels: List[str]):
        super().__init__(cfg)
        self.labels = labels

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        path = os.path.join(data_dir(cfg, "d2v_plugin.prep.image_folder"), "labels.txt")
        if not os.path.isfile(path):
            raise ImageDataError(f"{path} not found; write it with `python -m d2v_plugin.prep.image_folder ROOT --dest DATA`")
        with open(path, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
        if len(labels) < 2:
            raise ImageDataError(f"{path}: {len(labels)} class(es); classification needs class sub-folders in train/")
        return cls(cfg, labels)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.check_size(model)
        return model
