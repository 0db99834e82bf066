"""Fine-tuning heads on a ``Data2Vec`` encoder, in pure PyTorch.

Each head is a mixin for an ``nn.Module`` that holds the encoder as ``self.encoder``: the
fairseq models (``models/d2v_ctc.py`` & co.) mix it into ``BaseFairseqModel``, the
fairseq-free loader (``d2v_plugin.load`` of a fine-tuned checkpoint or export) into a plain
``nn.Module`` (``FineTuned``). Both therefore have the same parameter names (the state dict
of one loads into the other) and run the same ``predict``.

* ``d2v_ctc``: frames -> dropout -> Linear(D, V): letter logits per frame (CTC);
* ``d2v_audio_classifier``: the encoder output (``pooling=mean``) or a learned softmax
  sum of every layer (``weighted``) -> Linear(D, P) -> mean over real frames -> Linear(P, C);
* ``d2v_text_classifier``: the ``<s>`` token (``first``) or the mean of the real tokens ->
  Linear(D, D) -> tanh -> dropout -> Linear(D, C) (C = 1: regression);
* ``d2v_image_classifier``: mean of the patches -> LayerNorm -> Linear(D, C).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor


def masked_mean(x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """x: (B, T, D), padding_mask: (B, T) True at padding | None -> (B, D) mean over real positions."""
    if padding_mask is None:
        return x.mean(1)
    real = (~padding_mask).unsqueeze(-1).to(x.dtype)
    return (x * real).sum(1) / real.sum(1).clamp(min=1)


def _frozen(frozen: bool):
    return torch.no_grad() if frozen else contextlib.nullcontext()


class CtcHead:
    KIND, MODALITY = "d2v_ctc", "audio"

    def init_head(self, num_outputs: int, final_dropout: float = 0.0) -> None:
        self.final_dropout = nn.Dropout(final_dropout)
        self.proj = nn.Linear(self.encoder.settings.embed_dim, num_outputs)

    @staticmethod
    def config_from(state: Dict[str, Tensor], model_cfg: Dict) -> Dict:
        return {"num_outputs": state["proj.weight"].shape[0]}

    def predict(self, source: Tensor, padding_mask: Optional[Tensor] = None, masker: Optional[Callable] = None,
                frozen: bool = False) -> Dict[str, Optional[Tensor]]:
        """source: (B, S) waveforms -> logits (B, T, V), padding_mask (B, T) | None."""
        with _frozen(frozen):
            out = self.encoder.extract_features(source, padding_mask, masker=masker)
        return {"logits": self.proj(self.final_dropout(out["x"])), "padding_mask": out["padding_mask"]}


class AudioClassifierHead:
    KIND, MODALITY = "d2v_audio_classifier", "audio"

    def init_head(self, num_classes: int, proj_size: int = 256, pooling: str = "mean") -> None:
        layers = len(self.encoder.blocks) + 1  # the blocks' input and every block's output
        self.layer_weights = nn.Parameter(torch.ones(layers) / layers) if pooling == "weighted" else None
        self.projector = nn.Linear(self.encoder.settings.embed_dim, proj_size)
        self.classifier = nn.Linear(proj_size, num_classes)

    @staticmethod
    def config_from(state: Dict[str, Tensor], model_cfg: Dict) -> Dict:
        return {"num_classes": state["classifier.weight"].shape[0], "proj_size": state["projector.weight"].shape[0],
                "pooling": "weighted" if "layer_weights" in state else "mean"}

    def predict(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """source: (B, S) waveforms -> logits (B, classes)."""
        if self.layer_weights is None:
            out = self.encoder.extract_features(source, padding_mask, modality="audio")
            x, pad = out["x"], out["padding_mask"]  # (B, T, D), (B, T) | None
        else:
            states, pad = self.encoder.hidden_states(source, padding_mask, modality="audio")  # L + 1 x (B, T, D)
            w = torch.softmax(self.layer_weights, 0).to(states[0].dtype)
            x = (torch.stack(states, 0) * w.view(-1, 1, 1, 1)).sum(0)
        return {"logits": self.classifier(masked_mean(self.projector(x), pad))}


class TextClassifierHead:
    KIND, MODALITY = "d2v_text_classifier", "text"

    def init_head(self, num_outputs: int, pooling: str = "first", pooler_dropout: float = 0.0) -> None:
        D = self.encoder.settings.embed_dim
        self.pooling = pooling
        self.head = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Dropout(pooler_dropout), nn.Linear(D, num_outputs))

    @staticmethod
    def config_from(state: Dict[str, Tensor], model_cfg: Dict) -> Dict:
        return {"num_outputs": state["head.3.weight"].shape[0], "pooling": model_cfg.get("pooling", "first")}

    def predict(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """source: (B, T) tokens -> logits (B, classes) (or (B, 1) for regression)."""
        out = self.encoder.extract_features(source, padding_mask, modality="text")
        x = out["x"][:, 0] if self.pooling == "first" else masked_mean(out["x"], out["padding_mask"])
        return {"logits": self.head(x)}


class ImageClassifierHead:
    KIND, MODALITY = "d2v_image_classifier", "image"

    def init_head(self, num_classes: int) -> None:
        D = self.encoder.settings.embed_dim
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, num_classes)

    @staticmethod
    def config_from(state: Dict[str, Tensor], model_cfg: Dict) -> Dict:
        return {"num_classes": state["head.weight"].shape[0]}

    def predict(self, source: Tensor, padding_mask: Optional[Tensor] = None, frozen: bool = False) -> Dict[str, Tensor]:
        """source: (B, C, H, W) -> logits (B, classes)."""
        with _frozen(frozen):
            x = self.encoder.extract_features(source, modality="image")["x"]  # (B, L, D) patches
        return {"logits": self.head(self.norm(x.mean(1)))}


HEADS = {h.KIND: h for h in (CtcHead, AudioClassifierHead, TextClassifierHead, ImageClassifierHead)}


class FineTuned(nn.Module):
    """A ``Data2Vec`` encoder + the head of a fine-tuned model, without fairseq: built by
    ``fine_tuned(kind, encoder, head_config)``; ``forward`` is the head's ``predict``."""

    def __init__(self, encoder: nn.Module, **head_config):
        super().__init__()
        self.encoder = encoder
        self.init_head(**head_config)

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        return self.predict(source, padding_mask)


def fine_tuned(kind: str, encoder: nn.Module, head_config: Dict) -> FineTuned:
    """kind: a fine-tuned model's registered name -> FineTuned with that head (fresh weights)."""
    net = type(f"FineTuned_{kind}", (HEADS[kind], FineTuned), {})
    return net(encoder, **head_config)
