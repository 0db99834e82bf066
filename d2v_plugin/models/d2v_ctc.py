"""fairseq adapter: the ``d2v_ctc`` model — a pretrained d2v audio encoder + a CTC head.

Fine-tuning recipe of data2vec 1.0 §4.1 / 2.0 §4.1 (wav2vec 2.0's): the teacher, the
decoder and the regression head are dropped, a linear layer maps each frame to the
letter dictionary, the full sequence is masked in time and channel spans, the conv
extractor stays frozen (``feature_grad_mult 0``), the whole encoder can be frozen for
``freeze_finetune_updates`` and learning rates can decay towards the input (``layer_decay``).
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.models import register_model
from torch import Tensor

from ..modules.ctc import finetune_mask
from ..modules.data2vec import Data2Vec
from ..modules.heads import CtcHead
from .pretrained import FinetuneConfig, FinetuneModel, audio_normalize


@dataclass
class D2vCtcConfig(FinetuneConfig):
    final_dropout: float = field(default=0.0, metadata={"help": "dropout before the CTC projection"})
    feature_grad_mult: float = field(default=0.0, metadata={"help": "gradient multiplier of the conv extractor; 0 freezes it"})
    mask_prob: float = field(default=0.65, metadata={"help": "fraction of frames covered by time-mask spans"})
    mask_length: int = field(default=10, metadata={"help": "time-mask span length (frames)"})
    mask_channel_prob: float = field(default=0.0, metadata={"help": "fraction of channels zeroed by channel-mask spans"})
    mask_channel_length: int = field(default=64, metadata={"help": "channel-mask span length"})
    freeze_finetune_updates: int = field(
        default=0, metadata={"help": "train only the CTC head for this many updates, then everything"}
    )


@register_model("d2v_ctc", dataclass=D2vCtcConfig)
class D2vCtcModel(CtcHead, FinetuneModel):
    """The head and ``predict``: modules/heads.py ``CtcHead``; here the fine-tuning masks and freezing."""

    OVERRIDES = {
        **FinetuneModel.OVERRIDES,
        "dropout": ("encoder_dropout", "post_mlp_dropout", "audio_prenet_dropout"),
        "feature_grad_mult": ("audio_feature_grad_mult",),
    }

    def __init__(self, cfg: D2vCtcConfig, encoder: Data2Vec, num_outputs: int, pretrained_normalize: bool):
        super().__init__(cfg, encoder)
        self.pretrained_normalize = pretrained_normalize
        self.init_head(num_outputs, cfg.final_dropout)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @classmethod
    def build_model(cls, cfg: D2vCtcConfig, task) -> "D2vCtcModel":
        encoder, args = cls.build_encoder(cfg)
        return cls(cfg, encoder, len(task.target_dictionary), audio_normalize(args["task"]))

    def mask(self, feats: Tensor, padding_mask: Optional[Tensor], enc) -> Tensor:
        c = self.cfg
        return finetune_mask(feats, padding_mask, c.mask_prob, c.mask_length, c.mask_channel_prob, c.mask_channel_length,
                             enc.mask_emb, self.encoder.settings.mask_noise_std)

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, **unused) -> Dict[str, Optional[Tensor]]:
        """source: (B, L) waveform -> logits (B, T, V) over the dictionary, padding_mask (B, T) | None."""
        frozen = self.training and self.num_updates < self.cfg.freeze_finetune_updates
        return self.predict(source, padding_mask, masker=self.mask if self.training else None, frozen=frozen)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None) -> Tensor:
        logits = net_output["logits"].float()
        return F.log_softmax(logits, dim=-1) if log_probs else F.softmax(logits, dim=-1)

    @staticmethod
    def output_lengths(net_output) -> Tensor:
        """(B,) number of valid frames per utterance."""
        logits, pad = net_output["logits"], net_output["padding_mask"]
        if pad is None:
            return torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device)
        return (~pad).long().sum(-1)
