"""Fine-tuning on top of a d2v_plugin pretraining checkpoint: what the CTC and image
classification models share (loading, fresh-weights baseline, stored config, per-layer
learning rates)."""
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel
from omegaconf import DictConfig, OmegaConf

from ..fairseq_utils import set_cfg_field
from ..modules.data2vec import Data2Vec, parse_modalities
from ..official import OFFICIAL_MODELS, convert_checkpoint, model_name
from .config import D2vMultiConfig
from .settings import model_settings

logger = logging.getLogger(__name__)


class PretrainedCheckpointError(ValueError):
    """A pretrained checkpoint that cannot be fine-tuned as asked."""


@dataclass
class FinetuneConfig(FairseqDataclass):
    pretrained_path: str = field(
        default="", metadata={"help": "d2v_plugin pretraining checkpoint (model d2v_multi, algorithm v1 or v2)"}
    )
    random_init: bool = field(
        default=False,
        metadata={"help": "build the pretrained architecture with fresh weights (the from-scratch baseline)"},
    )
    pretrained_args: Any = field(
        default=None,
        metadata={"help": "set at build time: the pretrained model config (and task settings), so a fine-tuned "
                          "checkpoint reloads without pretrained_path"},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout in the blocks and prenet (replaces encoder/post_mlp/prenet dropout)"}
    )
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention probabilities"})
    activation_dropout: float = field(default=0.1, metadata={"help": "dropout inside the FFN"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the input of the shared blocks"})
    layerdrop: float = field(default=0.1, metadata={"help": "probability of skipping each block while training"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth of the last block (linear from 0)"})
    layer_decay: float = field(
        default=1.0,
        metadata={"help": "lr scale decay per block towards the input (< 1 needs optimizer composite with dynamic_groups)"},
    )


def read_pretrained(path: str, modality: Optional[str]) -> Dict[str, Any]:
    """-> {"model": config dict, "task": task settings, "state": weights, "task_state": the
    task's saved state} of a d2v_plugin pretraining checkpoint with a ``modality`` encoder
    (any, if None)."""
    from ..checkpoints import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(path, "a d2v_plugin pretraining checkpoint (checkpoint_last.pt of a d2v_multi run) "
                                     "or an official data2vec one")
    except CheckpointError as e:
        raise PretrainedCheckpointError(str(e)) from None
    cfg = ckpt.get("cfg")
    if model_name(cfg) in OFFICIAL_MODELS:
        logger.info("%s: an official %s checkpoint, converted on load", path, model_name(cfg))
        ckpt = convert_checkpoint(ckpt)
        cfg = ckpt["cfg"]
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg is not None and cfg.get("model") else {}
    name = model_cfg.get("_name")
    if name != "d2v_multi":
        origin = model_cfg.get("pretrained_path")
        hint = (f"; it is a fine-tuned {name} checkpoint: use the pretraining checkpoint it started from "
                f"(its model.pretrained_path: {origin})" if origin else "")
        raise PretrainedCheckpointError(
            f"{path}: model {name!r} is neither a d2v_plugin pretraining checkpoint (d2v_multi) nor an official "
            f"data2vec one (data2vec_multi, data2vec_audio, data2vec_text) nor fairseq RoBERTa{hint}"
        )
    if modality is not None and modality not in parse_modalities(model_cfg.get("modalities", "audio")):
        raise PretrainedCheckpointError(f"{path}: the model has no {modality} encoder (modalities={model_cfg['modalities']!r})")
    task = OmegaConf.to_container(cfg.task, resolve=True) if cfg.get("task") is not None else {}
    return {"model": model_cfg, "task": task, "state": ckpt["model"], "task_state": ckpt.get("task_state") or {}}


def audio_normalize(task: Dict[str, Any]) -> bool:
    """Whether the pretraining fed normalised waveforms (speech task: ``normalize``; joint
    multimodal task: ``audio_normalize``)."""
    return bool(task.get("normalize", task.get("audio_normalize", True)))


class FinetuneModel(BaseFairseqModel):
    """A pretrained ``Data2Vec`` encoder (``self.encoder``) plus a task head."""

    MODALITY = "audio"
    # fine-tuning setting -> the pretrained config fields it replaces
    OVERRIDES = {
        "attention_dropout": ("attention_dropout",),
        "activation_dropout": ("activation_dropout",),
        "dropout_input": ("dropout_input",),
        "layerdrop": ("layerdrop",),
        "drop_path": ("drop_path",),
    }

    def __init__(self, cfg, encoder: Data2Vec):
        """Subclasses add their head; ``layer_decay`` < 1 tags the encoder's parameters."""
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.num_updates = 0
        if cfg.layer_decay < 1.0:
            self.set_layer_decay(cfg.layer_decay)

    @classmethod
    def encoder_config(cls, pretrained_model: Dict[str, Any], cfg) -> D2vMultiConfig:
        """The pretrained architecture with the fine-tuning settings of ``OVERRIDES``."""
        known = {f.name for f in dataclasses.fields(D2vMultiConfig)}
        enc = D2vMultiConfig(**{k: v for k, v in pretrained_model.items() if k in known})
        for src, targets in cls.OVERRIDES.items():
            for t in targets:
                setattr(enc, t, getattr(cfg, src))
        return enc

    @classmethod
    def build_encoder(cls, cfg) -> Tuple[Data2Vec, Dict[str, Any]]:
        """-> the encoder (pretraining modules removed) and the stored pretrained args."""
        loaded = None
        if cfg.pretrained_args is None:  # first build: read the pretrained checkpoint
            if not cfg.pretrained_path:
                raise PretrainedCheckpointError(f"set model.pretrained_path to a d2v_plugin {cls.MODALITY} pretraining checkpoint")
            loaded = read_pretrained(cfg.pretrained_path, cls.MODALITY)
            set_cfg_field(cfg, "pretrained_args", {"model": loaded["model"], "task": loaded["task"]})
        args = cfg.pretrained_args
        args = OmegaConf.to_container(args, resolve=True) if isinstance(args, DictConfig) else args
        encoder = Data2Vec(model_settings(cls.encoder_config(args["model"], cfg)))
        if loaded is not None and not cfg.random_init:
            encoder.teacher = None  # fine-tuning starts from the student; the teacher entry is not read
            encoder.load_state_dict(cls.adapt_state(loaded["state"], encoder), strict=True)
            logger.info("loaded pretrained weights from %s", cfg.pretrained_path)
        elif loaded is not None:
            logger.info("random_init: the architecture of %s with fresh weights", cfg.pretrained_path)
        encoder.remove_pretraining_modules(cls.MODALITY)
        return encoder, args

    @classmethod
    def adapt_state(cls, state: Dict, encoder: Data2Vec) -> Dict:
        """Hook: adjust pretrained weights to the fine-tuning architecture."""
        return state

    def set_layer_decay(self, decay: float) -> None:
        """lr scale decay**(L - 1 - i) for block i (0-based, L blocks), decay**L for the
        modality encoder, 1 for the head; read by fairseq's composite optimizer (dynamic_groups)."""
        L = len(self.encoder.blocks)
        groups = [(self.encoder.modality_encoders, decay**L)]
        groups += [(block, decay ** (L - 1 - i)) for i, block in enumerate(self.encoder.blocks)]
        for module, scale in groups:
            for p in module.parameters():
                p.optim_overrides = {"optimizer": {"lr_scale": scale}}

    def set_num_updates(self, num_updates: int) -> None:
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def max_positions(self):
        return None
