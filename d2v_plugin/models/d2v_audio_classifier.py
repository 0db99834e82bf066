"""fairseq adapter: the ``d2v_audio_classifier`` model — a pretrained d2v speech encoder +
an utterance head, as transformers' ``Data2VecAudioForSequenceClassification``: the
encoder output (``pooling=mean``) or a learned softmax-weighted sum of every layer
(``pooling=weighted``: the blocks' input and each block's output, transformers'
``use_weighted_layer_sum``) -> Linear(D, proj) -> mean over the real frames -> Linear(proj,
classes)."""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from torch import Tensor

from ..modules.data2vec import Data2Vec
from .pretrained import FinetuneConfig, FinetuneModel, audio_normalize


@dataclass
class D2vAudioClassifierConfig(FinetuneConfig):
    pooling: ChoiceEnum(["mean", "weighted"]) = field(
        default="mean", metadata={"help": "frames from: mean: the encoder output; weighted: a learned softmax-weighted "
                                          "sum of every layer (needs layerdrop=0)"})
    classifier_proj_size: int = field(default=256, metadata={"help": "width of the projection before mean pooling"})
    linear_probe: bool = field(default=False, metadata={"help": "freeze the encoder and train the head only"})


@register_model("d2v_audio_classifier", dataclass=D2vAudioClassifierConfig)
class D2vAudioClassifier(FinetuneModel):
    MODALITY = "audio"
    OVERRIDES = {**FinetuneModel.OVERRIDES, "dropout": ("encoder_dropout", "post_mlp_dropout", "audio_prenet_dropout")}

    def __init__(self, cfg: D2vAudioClassifierConfig, encoder: Data2Vec, num_classes: int, pretrained_normalize: bool):
        super().__init__(cfg, encoder)
        if cfg.pooling == "weighted" and cfg.layerdrop > 0:
            raise ValueError(f"model.pooling=weighted reads every layer, so no layer may be dropped: set model.layerdrop=0 "
                             f"(it is {cfg.layerdrop})")
        D = encoder.settings.embed_dim
        self.pretrained_normalize = pretrained_normalize
        self.layer_weights = nn.Parameter(torch.ones(len(encoder.blocks) + 1) / (len(encoder.blocks) + 1)) \
            if cfg.pooling == "weighted" else None
        self.projector = nn.Linear(D, cfg.classifier_proj_size)
        self.classifier = nn.Linear(cfg.classifier_proj_size, num_classes)
        if cfg.linear_probe:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    @classmethod
    def build_model(cls, cfg: D2vAudioClassifierConfig, task) -> "D2vAudioClassifier":
        encoder, args = cls.build_encoder(cfg)
        return cls(cfg, encoder, len(task.labels), audio_normalize(args["task"]))

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, **unused) -> Dict[str, Tensor]:
        """source: (B, S) waveforms -> logits (B, classes)."""
        enc = self.encoder
        if self.layer_weights is None:
            out = enc.extract_features(source, padding_mask, modality="audio")
            x, pad = out["x"], out["padding_mask"]  # (B, T, D), (B, T) | None
        else:
            states, pad = enc.hidden_states(source, padding_mask, modality="audio")  # L + 1 x (B, T, D)
            w = torch.softmax(self.layer_weights, 0)
            x = (torch.stack(states, 0) * w.view(-1, 1, 1, 1).to(states[0].dtype)).sum(0)
        h = self.projector(x)  # (B, T, P)
        real = (~pad).unsqueeze(-1).to(h.dtype) if pad is not None else h.new_ones(h.shape[:2] + (1,))
        return {"logits": self.classifier((h * real).sum(1) / real.sum(1).clamp(min=1))}
