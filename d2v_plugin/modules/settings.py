"""Typed settings of the pure modules: what ``Data2Vec`` and each modality encoder are built from.

The fairseq adapter keeps one flat config (``models/config.py``: ``audio_mask_prob``,
``image_decoder_dim``, ...) because flat names are what fairseq's flags and Hydra
overrides reach; ``models/settings.py`` turns it into these dataclasses in one place.
The defaults, and the meaning, unit and paper value of every field, are those of its flat
counterpart (``<modality>_<name>``, ``<modality>_decoder_<name>``, or the same name for
shared fields), which owns them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass
class DecoderSettings:
    """The data2vec 2.0 conv decoder (§3.1): width, kernel, layers, groups, residuals, projection."""
    dim: int
    kernel: int
    layers: int
    groups: int
    residual: bool
    projection_layers: int
    projection_ratio: float


@dataclass
class AudioSettings:
    conv_feature_layers: str
    extractor_mode: str
    feature_grad_mult: float
    conv_pos_width: int
    conv_pos_depth: int
    conv_pos_groups: int
    prenet_depth: int
    prenet_dropout: float
    use_alibi: bool
    alibi_learned_scale: bool
    mask_type: str
    mask_prob: float
    mask_length: int
    mask_prob_adjust: float
    decoder: DecoderSettings


@dataclass
class ImageSettings:
    input_size: int
    patch_size: int
    in_chans: int
    prenet_depth: int
    prenet_dropout: float
    num_extra_tokens: int
    mask_type: str
    mask_prob: float
    mask_length: int
    mask_prob_adjust: float
    ema_local_encoder: bool
    cls_loss: float
    decoder: DecoderSettings


@dataclass
class TextSettings:
    vocab_size: int
    pad_index: int
    mask_index: int
    max_positions: int
    dropout: float
    prenet_depth: int
    prenet_dropout: float
    mask_type: str
    mask_prob: float
    mask_length: int
    keep_ends: bool
    leave_unmasked_prob: float
    random_token_prob: float
    ema_encoder_only: bool
    decoder: DecoderSettings


@dataclass
class Data2VecSettings:
    """Shared settings (blocks, targets, loss, teacher) and one settings object per modality built."""
    algorithm: str
    modalities: Tuple[str, ...]
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    norm_eps: float
    layer_norm_first: bool
    encoder_dropout: float
    attention_dropout: float
    activation_dropout: float
    post_mlp_dropout: float
    dropout_input: float
    layerdrop: float
    drop_path: float
    clone_batch: int
    mask_noise_std: float
    decoder_input_dropout: float
    average_top_k_layers: int
    target_layer_norm: str
    target_final_norm: str
    padding_aware: bool
    head_layers: int
    loss: str
    loss_beta: float
    loss_scale: Optional[float]
    ema_decay: float
    ema_end_decay: float
    ema_anneal_end_step: int
    ema_copy_pos_conv: bool
    compile_blocks: bool
    min_target_var: float  # a standard deviation: mean over channels of the targets' std
    min_pred_var: float  # a standard deviation, as min_target_var
    collapse_check_start_update: int
    collapse_patience: int
    audio: Optional[AudioSettings] = None
    image: Optional[ImageSettings] = None
    text: Optional[TextSettings] = None
