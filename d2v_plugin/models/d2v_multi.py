"""fairseq adapter: the ``d2v_multi`` model (data2vec 1.0 and 2.0, any modality)."""
import dataclasses

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import BaseFairseqModel, register_model

from ..modules.data2vec import Data2Vec
from .config import D2vMultiConfig
from .settings import model_settings


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


@register_model("d2v_multi", dataclass=D2vMultiConfig)
class D2vMultiModel(Data2Vec, BaseFairseqModel):
    """``Data2Vec`` (pure PyTorch, d2v_plugin/modules/data2vec.py) as a fairseq model.

    The teacher is stepped by the d2v tasks' ``optimizer_step`` (once per optimizer
    update, whatever ``update_freq``), not by ``set_num_updates``, which fairseq
    calls before every micro-batch and on checkpoint load.
    """

    @classmethod
    def add_args(cls, parser):
        """fairseq's flags, except that booleans take a value (``--audio-use-alibi false``)
        instead of fairseq's store_true/store_false toggles, which invert True defaults."""
        for f in dataclasses.fields(D2vMultiConfig):
            if f.type is bool:
                parser.add_argument("--" + f.name.replace("_", "-"), type=parse_bool, metavar="true|false",
                                    help=f"{f.metadata['help']} (default: {str(f.default).lower()})")
        gen_parser_from_dataclass(parser, D2vMultiConfig(), delete_default=True)  # skips the flags added above

    def __init__(self, cfg: D2vMultiConfig):
        super().__init__(model_settings(cfg))
        self.cfg = cfg  # the flat fairseq config, as fairseq models keep it

    @classmethod
    def build_model(cls, cfg: D2vMultiConfig, task=None) -> "D2vMultiModel":
        return cls(cfg)
