"""Fine-tuning on top of a d2v_plugin pretraining checkpoint: what the CTC and image
classification models share (loading, fresh-weights baseline, stored config, per-layer
learning rates)."""
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel
from omegaconf import DictConfig, OmegaConf

from ..checkpoints import PretrainedCheckpointError, audio_normalize, read_pretrained  # noqa: F401  (their home before)
from ..fairseq_utils import set_cfg_field
from ..modules.data2vec import Data2Vec
from .config import D2vMultiConfig
from .settings import model_settings

logger = logging.getLogger(__name__)


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
