"""fairseq adapter: the ``d2v_text_pretraining`` task (text self-supervision).

Reads ``fairseq-preprocess`` output (``dict.txt``, ``{split}.bin/.idx``; made by
``d2v_plugin.prep.text``), cuts blocks of ``tokens_per_sample`` tokens, and draws the
model's masks in the data workers. The data directory's sentencepiece model is saved
in every checkpoint (``task_state``), so later steps never need the original file.
"""

import logging
import os
from dataclasses import dataclass, field

import torch
from fairseq.data import Dictionary
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.text import TextBlockDataset, TextDataError
from ..fairseq_utils import set_cfg_field, unwrap
from .base import EMAStepMixin, FinetuneTaskMixin, RunConfig, RunFeedbackMixin, WorkerMasksMixin, data_dir

logger = logging.getLogger(__name__)
BREAK_MODE = ChoiceEnum(["none", "complete", "complete_doc", "eos"])


@dataclass
class D2vTextPretrainingConfig(RunConfig):
    data: str = field(default=MISSING, metadata={"help": "directory from d2v_plugin.prep.text (dict.txt, {split}.bin/.idx)"})
    tokens_per_sample: int = field(default=512, metadata={"help": "tokens per sample, <s> included"})
    sample_break_mode: BREAK_MODE = field(
        default="none", metadata={"help": "none: fixed blocks across lines; complete: whole lines up to the size; eos: one line"}
    )
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the batch order and masks (common.seed)"})


class TokenTask(RunFeedbackMixin, FairseqTask):
    """A task over the tokens of one dictionary (``self.dictionary``)."""

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary


@register_task("d2v_text_pretraining", dataclass=D2vTextPretrainingConfig)
class D2vTextPretrainingTask(EMAStepMixin, WorkerMasksMixin, TokenTask):
    def __init__(self, cfg: D2vTextPretrainingConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        spm = os.path.join(cfg.data, "spm.model")
        self.spm_model = open(spm, "rb").read() if os.path.isfile(spm) else b""
        with open(os.path.join(cfg.data, "dict.txt"), "rb") as f:
            self.dict_txt = f.read()

    @classmethod
    def setup_task(cls, cfg: D2vTextPretrainingConfig, **kwargs):
        path = os.path.join(data_dir(cfg, "d2v_plugin.prep.text"), "dict.txt")
        if not os.path.isfile(path):
            raise TextDataError(f"{path} not found; binarise the text with `python -m d2v_plugin.prep.text RAW --dest {cfg.data}`")
        dictionary = Dictionary.load(path)
        dictionary.add_symbol("<mask>")
        return cls(cfg, dictionary)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        ds = TextBlockDataset(os.path.join(self.cfg.data, split), self.dictionary, self.cfg.tokens_per_sample,
                              self.cfg.sample_break_mode, self.cfg.seed)
        self.attach_masking(ds)
        self.datasets[split] = ds
        return ds

    def build_model(self, cfg, from_checkpoint=False):
        self.configure_model(cfg)
        model = super().build_model(cfg, from_checkpoint)
        self.attach_model(model)
        return model

    def configure_model(self, cfg) -> None:
        """The model config's dictionary-dependent fields."""
        set_cfg_field(cfg, "text_vocab_size", len(self.dictionary))
        set_cfg_field(cfg, "text_pad_index", self.dictionary.pad())
        set_cfg_field(cfg, "text_mask_index", self.dictionary.index("<mask>"))

    def attach_model(self, model) -> None:
        """Check the model against the data settings and hand its masks to the datasets."""
        encoders = getattr(unwrap(model), "modality_encoders", {})
        if "text" not in encoders:
            raise ValueError("d2v_text_pretraining needs a model with a text encoder (model.modalities=text)")
        if encoders["text"].max_positions < self.cfg.tokens_per_sample:
            raise ValueError(f"task.tokens_per_sample={self.cfg.tokens_per_sample} exceeds model.text_max_positions="
                             f"{encoders['text'].max_positions}; lower the first or raise the second")
        self.share_masking(encoders["text"].masking)

    def state_dict(self):
        """Saved with every checkpoint: the sentencepiece model and the dictionary of the data
        directory, so the checkpoint alone can encode text (d2v_plugin.extract)."""
        as_bytes = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else None  # noqa: E731
        return {"spm_model": as_bytes(self.spm_model), "dictionary": as_bytes(self.dict_txt)}

    def load_state_dict(self, state_dict):
        for key, attr in (("spm_model", "spm_model"), ("dictionary", "dict_txt")):
            saved = state_dict.get(key) if state_dict else None
            if saved is not None:
                setattr(self, attr, bytes(saved.numpy().tobytes()))

    def max_positions(self):
        return self.cfg.tokens_per_sample


@dataclass
class D2vTextClassificationConfig(RunConfig):
    data: str = field(default=MISSING, metadata={"help": "directory from d2v_plugin.prep.text_classification"})
    max_positions: int = field(default=512, metadata={"help": "longest input in tokens; longer samples are cut (logged)"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the batch order (common.seed)"})
    train_subset: str = field(default=II("dataset.train_subset"), metadata={"help": "the training split (shuffled)"})


@register_task("d2v_text_classification", dataclass=D2vTextClassificationConfig)
class D2vTextClassificationTask(FinetuneTaskMixin, TokenTask):
    """Sentence (pair) classification or regression (``labels.txt`` empty) for fine-tuning and ``fairseq-validate``."""

    def __init__(self, cfg: D2vTextClassificationConfig, dictionary: Dictionary, labels):
        super().__init__(cfg)
        self.dictionary, self.labels = dictionary, labels
        self.regression = not labels

    @classmethod
    def setup_task(cls, cfg: D2vTextClassificationConfig, **kwargs):
        data_dir(cfg, "d2v_plugin.prep.text_classification")
        for name in ("dict.txt", "labels.txt"):
            if not os.path.isfile(os.path.join(cfg.data, name)):
                raise TextDataError(f"{os.path.join(cfg.data, name)} not found; run d2v_plugin.prep.text_classification")
        dictionary = Dictionary.load(os.path.join(cfg.data, "dict.txt"))
        dictionary.add_symbol("<mask>")  # as in pretraining: the same vocabulary size
        with open(os.path.join(cfg.data, "labels.txt"), encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
        return cls(cfg, dictionary, labels)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        from ..data.text import SentenceDataset

        self.datasets[split] = SentenceDataset(self.cfg.data, split, self.dictionary, self.cfg.max_positions, self.regression,
                                               shuffle=split == self.cfg.train_subset, seed=self.cfg.seed)
        return self.datasets[split]

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        vocab = unwrap(model).encoder.settings.text.vocab_size
        if vocab != len(self.dictionary):
            raise ValueError(f"the pretrained model has {vocab} tokens but {self.cfg.data}/dict.txt gives {len(self.dictionary)}; "
                             "prepare the classification data with the pretraining data's dictionary (--text-data)")
        return model

    def max_positions(self):
        return self.cfg.max_positions
