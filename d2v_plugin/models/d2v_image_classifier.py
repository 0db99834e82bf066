"""fairseq adapter: the ``d2v_image_classifier`` model — a pretrained d2v image encoder
+ mean-pool -> LayerNorm -> linear head (data2vec 2.0 §4.1, "Computer vision").

``linear_probe`` freezes the encoder (eval mode, no gradients) and trains the head
only. When ``input_size`` differs from pretraining the position table is resized.
"""
from dataclasses import dataclass, field
from typing import Dict

import torch.nn as nn
from fairseq.models import register_model
from torch import Tensor

from ..modules.data2vec import Data2Vec
from ..modules.heads import ImageClassifierHead
from ..modules.positional import resize_grid
from .pretrained import FinetuneConfig, FinetuneModel


@dataclass
class D2vImageClassifierConfig(FinetuneConfig):
    input_size: int = field(default=0, metadata={"help": "image side for fine-tuning; 0 = the pretraining size"})
    linear_probe: bool = field(default=False, metadata={"help": "freeze the encoder and train the head only"})
    head_init_scale: float = field(default=0.001, metadata={"help": "scale of the head's initial weights"})


@register_model("d2v_image_classifier", dataclass=D2vImageClassifierConfig)
class D2vImageClassifier(ImageClassifierHead, FinetuneModel):
    """The head and ``predict``: modules/heads.py ``ImageClassifierHead``."""

    OVERRIDES = {**FinetuneModel.OVERRIDES, "dropout": ("encoder_dropout", "post_mlp_dropout", "image_prenet_dropout")}

    def __init__(self, cfg: D2vImageClassifierConfig, encoder: Data2Vec, num_classes: int):
        super().__init__(cfg, encoder)
        self.init_head(num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        self.head.weight.data.mul_(cfg.head_init_scale)
        nn.init.zeros_(self.head.bias)
        if cfg.linear_probe:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    @classmethod
    def encoder_config(cls, pretrained_model, cfg):
        enc = super().encoder_config(pretrained_model, cfg)
        if cfg.input_size:
            enc.image_input_size = cfg.input_size
        return enc

    @classmethod
    def adapt_state(cls, state: Dict, encoder: Data2Vec) -> Dict:
        key = "modality_encoders.image.positions"
        enc = encoder.modality_encoders["image"]
        if key in state and state[key].shape != enc.positions.shape:
            old = int(round(state[key].shape[1] ** 0.5))
            state = {**state, key: resize_grid(state[key], (old, old), enc.grid)}
            state.pop("_ema", None)  # the teacher is dropped anyway; its table has the old size
        return state

    @classmethod
    def build_model(cls, cfg: D2vImageClassifierConfig, task) -> "D2vImageClassifier":
        encoder, _ = cls.build_encoder(cfg)
        return cls(cfg, encoder, len(task.labels))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.linear_probe:
            self.encoder.eval()
        return self

    def forward(self, source: Tensor, **unused) -> Dict[str, Tensor]:
        """source: (B, C, H, W) -> logits (B, classes)."""
        return self.predict(source, frozen=self.cfg.linear_probe)
