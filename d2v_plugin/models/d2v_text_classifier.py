"""fairseq adapter: the ``d2v_text_classifier`` model — a pretrained d2v text encoder +
a head on the first token (``<s>``, RoBERTa's and the reference's) or on the mean of the
real tokens (``pooling=mean``): dense -> tanh -> dropout -> linear, one output per class,
or one for regression."""
from dataclasses import dataclass, field
from typing import Dict

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from torch import Tensor

from ..modules.data2vec import Data2Vec
from ..modules.heads import TextClassifierHead
from .pretrained import FinetuneConfig, FinetuneModel


@dataclass
class D2vTextClassifierConfig(FinetuneConfig):
    pooler_dropout: float = field(default=0.0, metadata={"help": "dropout in the classification head"})
    pooling: ChoiceEnum(["first", "mean"]) = field(
        default="first", metadata={"help": "sentence vector: first: the <s> token's output (RoBERTa); mean: mean over real tokens"}
    )


@register_model("d2v_text_classifier", dataclass=D2vTextClassifierConfig)
class D2vTextClassifier(TextClassifierHead, FinetuneModel):
    """The head and ``predict``: modules/heads.py ``TextClassifierHead``."""

    OVERRIDES = {**FinetuneModel.OVERRIDES, "dropout": ("encoder_dropout", "post_mlp_dropout", "text_dropout")}

    def __init__(self, cfg: D2vTextClassifierConfig, encoder: Data2Vec, num_outputs: int):
        super().__init__(cfg, encoder)
        self.init_head(num_outputs, cfg.pooling, cfg.pooler_dropout)

    @classmethod
    def build_model(cls, cfg: D2vTextClassifierConfig, task) -> "D2vTextClassifier":
        encoder, _ = cls.build_encoder(cfg)
        return cls(cfg, encoder, 1 if task.regression else len(task.labels))

    def forward(self, source: Tensor, padding_mask=None, **unused) -> Dict[str, Tensor]:
        """source: (B, T) tokens -> logits (B, classes) (or (B, 1) for regression)."""
        return self.predict(source, padding_mask)
