"""fairseq adapter: the ``d2v_ctc`` model — a pretrained d2v audio encoder + a CTC head.

Fine-tuning recipe of data2vec 1.0 §4.1 / 2.0 §4.1 (wav2vec 2.0's): the teacher, the
decoder and the regression head are dropped, a linear layer maps each frame to the
letter dictionary, the full sequence is masked in time and channel spans, the conv
extractor stays frozen (``feature_grad_mult 0``), the whole encoder can be frozen for
``freeze_finetune_updates`` and learning rates can decay towards the input (``layer_decay``).
"""
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from ..modules.ctc import finetune_mask
from ..modules.data2vec import Data2Vec
from .config import D2vMultiConfig

logger = logging.getLogger(__name__)


class PretrainedCheckpointError(ValueError):
    """A pretrained checkpoint that cannot be fine-tuned as asked."""


@dataclass
class D2vCtcConfig(FairseqDataclass):
    pretrained_path: str = field(
        default="", metadata={"help": "d2v_plugin speech pretraining checkpoint (model d2v_multi, algorithm v1 or v2)"}
    )
    random_init: bool = field(
        default=False,
        metadata={"help": "build the pretrained architecture with fresh weights (the from-scratch baseline)"},
    )
    pretrained_args: Any = field(
        default=None,
        metadata={"help": "set at build time: the pretrained model config and its task.normalize, so a fine-tuned "
                          "checkpoint reloads without pretrained_path"},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout in the blocks and prenet (replaces encoder/post_mlp/prenet dropout)"}
    )
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention probabilities"})
    activation_dropout: float = field(default=0.1, metadata={"help": "dropout inside the FFN"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the input of the shared blocks"})
    final_dropout: float = field(default=0.0, metadata={"help": "dropout before the CTC projection"})
    layerdrop: float = field(default=0.1, metadata={"help": "probability of skipping each block while training"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth of the last block (linear from 0)"})
    feature_grad_mult: float = field(default=0.0, metadata={"help": "gradient multiplier of the conv extractor; 0 freezes it"})
    mask_prob: float = field(default=0.65, metadata={"help": "fraction of frames covered by time-mask spans"})
    mask_length: int = field(default=10, metadata={"help": "time-mask span length (frames)"})
    mask_channel_prob: float = field(default=0.0, metadata={"help": "fraction of channels zeroed by channel-mask spans"})
    mask_channel_length: int = field(default=64, metadata={"help": "channel-mask span length"})
    freeze_finetune_updates: int = field(
        default=0, metadata={"help": "train only the CTC head for this many updates, then everything"}
    )
    layer_decay: float = field(
        default=1.0,
        metadata={"help": "lr scale decay per block towards the input (< 1 needs optimizer composite with dynamic_groups)"},
    )


# fine-tuning setting -> the pretrained config fields it replaces
OVERRIDES = {
    "dropout": ("encoder_dropout", "post_mlp_dropout", "audio_prenet_dropout"),
    "attention_dropout": ("attention_dropout",),
    "activation_dropout": ("activation_dropout",),
    "dropout_input": ("dropout_input",),
    "layerdrop": ("layerdrop",),
    "drop_path": ("drop_path",),
    "feature_grad_mult": ("audio_feature_grad_mult",),
}


def read_pretrained(path: str) -> Dict[str, Any]:
    """-> {"model": config dict, "normalize": bool, "state": weights} of a d2v_plugin pretraining checkpoint."""
    try:
        ckpt = checkpoint_utils.load_checkpoint_to_cpu(path)
    except FileNotFoundError as e:
        raise PretrainedCheckpointError(f"model.pretrained_path={path!r}: file not found") from e
    cfg = ckpt.get("cfg")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg is not None and cfg.get("model") else {}
    name = model_cfg.get("_name")
    if name != "d2v_multi":
        raise PretrainedCheckpointError(
            f"{path}: model {name!r} is not a d2v_plugin pretraining checkpoint (d2v_multi); convert official "
            "data2vec checkpoints first with `python -m d2v_plugin.convert`"
        )
    if "audio" not in str(model_cfg.get("modalities", "audio")):
        raise PretrainedCheckpointError(f"{path}: the model has no audio encoder (modalities={model_cfg['modalities']!r})")
    normalize = bool(cfg.task.get("normalize", True)) if cfg.get("task") is not None else True
    return {"model": model_cfg, "normalize": normalize, "state": ckpt["model"]}


def encoder_config(pretrained_model: Dict[str, Any], cfg: D2vCtcConfig) -> D2vMultiConfig:
    """The pretrained architecture with the fine-tuning dropouts, layerdrop and extractor freeze."""
    known = {f.name for f in dataclasses.fields(D2vMultiConfig)}
    enc = D2vMultiConfig(**{k: v for k, v in pretrained_model.items() if k in known})
    for src, targets in OVERRIDES.items():
        for t in targets:
            setattr(enc, t, getattr(cfg, src))
    return enc


def store_pretrained_args(cfg, args: Dict[str, Any]) -> None:
    """Record the pretrained config in a model config (DictConfig or dataclass). fairseq
    builds models from a merged copy of ``cfg.model``, so the task stores it again in the
    node it was given: that one is saved with the checkpoint."""
    if isinstance(cfg, DictConfig):
        with open_dict(cfg):
            cfg.pretrained_args = args
    else:
        cfg.pretrained_args = args


@register_model("d2v_ctc", dataclass=D2vCtcConfig)
class D2vCtcModel(BaseFairseqModel):
    def __init__(self, cfg: D2vCtcConfig, encoder: Data2Vec, num_outputs: int, pretrained_normalize: bool):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.pretrained_normalize = pretrained_normalize
        self.final_dropout = nn.Dropout(cfg.final_dropout)
        self.proj = nn.Linear(encoder.cfg.embed_dim, num_outputs)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.num_updates = 0
        if cfg.layer_decay < 1.0:
            self.set_layer_decay(cfg.layer_decay)

    @classmethod
    def build_model(cls, cfg: D2vCtcConfig, task) -> "D2vCtcModel":
        loaded = None
        if cfg.pretrained_args is None:  # first build: read the pretrained checkpoint
            if not cfg.pretrained_path:
                raise PretrainedCheckpointError("set model.pretrained_path to a d2v_plugin speech pretraining checkpoint")
            loaded = read_pretrained(cfg.pretrained_path)
            store_pretrained_args(cfg, {"model": loaded["model"], "normalize": loaded["normalize"]})
        args = cfg.pretrained_args
        args = OmegaConf.to_container(args, resolve=True) if isinstance(args, DictConfig) else args
        encoder = Data2Vec(encoder_config(args["model"], cfg))
        if loaded is not None and not cfg.random_init:
            encoder.load_state_dict(loaded["state"], strict=True)
            logger.info("loaded pretrained weights from %s", cfg.pretrained_path)
        elif loaded is not None:
            logger.info("random_init: the architecture of %s with fresh weights", cfg.pretrained_path)
        encoder.remove_pretraining_modules("audio")
        return cls(cfg, encoder, len(task.target_dictionary), bool(args["normalize"]))

    def set_layer_decay(self, decay: float) -> None:
        """lr scale decay**(L - i) for block i (0-based, L blocks), decay**L for the audio
        encoder, 1 for the CTC head; read by fairseq's composite optimizer (dynamic_groups)."""
        L = len(self.encoder.blocks)
        groups = [(self.encoder.modality_encoders, decay**L)]
        groups += [(block, decay ** (L - 1 - i)) for i, block in enumerate(self.encoder.blocks)]
        for module, scale in groups:
            for p in module.parameters():
                p.optim_overrides = {"optimizer": {"lr_scale": scale}}

    def set_num_updates(self, num_updates: int) -> None:
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def mask(self, feats: Tensor, padding_mask: Optional[Tensor], enc) -> Tensor:
        c = self.cfg
        return finetune_mask(feats, padding_mask, c.mask_prob, c.mask_length, c.mask_channel_prob, c.mask_channel_length,
                             enc.mask_emb, self.encoder.cfg.mask_noise_std)

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, **unused) -> Dict[str, Optional[Tensor]]:
        """source: (B, L) waveform -> logits (B, T, V) over the dictionary, padding_mask (B, T) | None."""
        frozen = self.training and self.num_updates < self.cfg.freeze_finetune_updates
        masker = self.mask if self.training else None
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = self.encoder.extract_features(source, padding_mask, masker=masker)
        return {"logits": self.proj(self.final_dropout(out["x"])), "padding_mask": out["padding_mask"]}

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

    def max_positions(self):
        return None
