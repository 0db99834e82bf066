"""fairseq adapter: the ``d2v_multi`` model (data2vec 1.0 and 2.0, any modality)."""
from __future__ import annotations

from fairseq.models import BaseFairseqModel, register_model

from ..modules.data2vec import Data2Vec
from .config import D2vMultiConfig


@register_model("d2v_multi", dataclass=D2vMultiConfig)
class D2vMultiModel(Data2Vec, BaseFairseqModel):
    """``Data2Vec`` (pure PyTorch, d2v_plugin/modules/data2vec.py) as a fairseq model.

    The teacher is stepped by the d2v tasks' ``optimizer_step`` (once per optimizer
    update, whatever ``update_freq``), not by ``set_num_updates``, which fairseq
    calls before every micro-batch and on checkpoint load.
    """

    @classmethod
    def build_model(cls, cfg: D2vMultiConfig, task=None) -> "D2vMultiModel":
        return cls(cfg)
