"""The one place where the flat fairseq model config becomes the pure modules' typed settings.

``<modality>_<name>`` fills ``<Modality>Settings.<name>``, ``<modality>_decoder_<name>`` its
``decoder``, every other name the shared ``Data2VecSettings`` field of the same name; a
modality's settings exist only when it is listed in ``modalities``.
"""
from __future__ import annotations

import dataclasses

from ..modules.data2vec import parse_modalities
from ..modules.settings import AudioSettings, Data2VecSettings, DecoderSettings, ImageSettings, TextSettings

MODALITY_SETTINGS = {"audio": AudioSettings, "image": ImageSettings, "text": TextSettings}


def _value(cfg, name: str):
    v = getattr(cfg, name)
    return getattr(v, "value", v)  # ChoiceEnum members -> their string


def _modality(cfg, modality: str):
    cls = MODALITY_SETTINGS[modality]
    decoder = DecoderSettings(**{f.name: _value(cfg, f"{modality}_decoder_{f.name}") for f in dataclasses.fields(DecoderSettings)})
    values = {f.name: _value(cfg, f"{modality}_{f.name}") for f in dataclasses.fields(cls) if f.name != "decoder"}
    return cls(**values, decoder=decoder)


def model_settings(cfg) -> Data2VecSettings:
    """A ``D2vMultiConfig`` (dataclass or DictConfig) -> ``Data2VecSettings``."""
    modalities = parse_modalities(_value(cfg, "modalities"))
    shared = {f.name: _value(cfg, f.name) for f in dataclasses.fields(Data2VecSettings)
              if f.name not in ("modalities", *MODALITY_SETTINGS)}
    return Data2VecSettings(**shared, modalities=modalities, **{m: _modality(cfg, m) for m in modalities})
