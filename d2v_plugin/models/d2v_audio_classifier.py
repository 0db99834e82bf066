"""fairseq adapter: the ``d2v_audio_classifier`` model — a pretrained d2v speech encoder +
an utterance head, as transformers' ``Data2VecAudioForSequenceClassification``: the
encoder output (``pooling=mean``) or a learned softmax-weighted sum of every layer
(``pooling=weighted``: the blocks' input and each block's output, transformers'
``use_weighted_layer_sum``) -> Linear(D, proj) -> mean over the real frames -> Linear(proj,
classes)."""
from dataclasses import dataclass, field
from typing import Dict, Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from torch import Tensor

from ..modules.data2vec import Data2Vec
from ..modules.heads import AudioClassifierHead
from .pretrained import FinetuneConfig, FinetuneModel, audio_normalize


@dataclass
class D2vAudioClassifierConfig(FinetuneConfig):
    pooling: ChoiceEnum(["mean", "weighted"]) = field(
        default="mean", metadata={"help": "frames from: mean: the encoder output; weighted: a learned softmax-weighted "
                                          "sum of every layer (needs layerdrop=0)"})
    classifier_proj_size: int = field(default=256, metadata={"help": "width of the projection before mean pooling"})
    linear_probe: bool = field(default=False, metadata={"help": "freeze the encoder and train the head only"})


@register_model("d2v_audio_classifier", dataclass=D2vAudioClassifierConfig)
class D2vAudioClassifier(AudioClassifierHead, FinetuneModel):
    """The head and ``predict``: modules/heads.py ``AudioClassifierHead``."""

    OVERRIDES = {**FinetuneModel.OVERRIDES, "dropout": ("encoder_dropout", "post_mlp_dropout", "audio_prenet_dropout")}

    def __init__(self, cfg: D2vAudioClassifierConfig, encoder: Data2Vec, num_classes: int, pretrained_normalize: bool):
        super().__init__(cfg, encoder)
        if cfg.pooling == "weighted" and cfg.layerdrop > 0:
            raise ValueError(f"model.pooling=weighted reads every layer, so no layer may be dropped: set model.layerdrop=0 "
                             f"(it is {cfg.layerdrop})")
        self.pretrained_normalize = pretrained_normalize
        self.init_head(num_classes, cfg.classifier_proj_size, cfg.pooling)
        if cfg.linear_probe:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    @classmethod
    def build_model(cls, cfg: D2vAudioClassifierConfig, task) -> "D2vAudioClassifier":
        encoder, args = cls.build_encoder(cfg)
        return cls(cfg, encoder, len(task.labels), audio_normalize(args["task"]))

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, **unused) -> Dict[str, Tensor]:
        """source: (B, S) waveforms -> logits (B, classes)."""
        return self.predict(source, padding_mask)
