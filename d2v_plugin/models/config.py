"""Typed configuration of ``d2v_multi``.

One flat dataclass: shared settings unprefixed, modality settings prefixed with the
modality (``audio_mask_prob``). Flat names are what make every setting reachable the
same way from a Hydra YAML (``model.audio_mask_prob: 0.5``) and from plain
``fairseq-train`` flags (``--audio-mask-prob 0.5``); fairseq's argparse bridge cannot
reach fields of nested dataclasses by name. Defaults are the data2vec 2.0 speech
Base recipe unless the help says otherwise.
"""

from dataclasses import dataclass, field
from typing import Optional

try:
    from fairseq.dataclass import ChoiceEnum, FairseqDataclass
except ImportError:  # loading and extracting without fairseq: the same fields on plain dataclasses
    def ChoiceEnum(choices):  # noqa: N802  (fairseq's name)
        return str

    @dataclass
    class FairseqDataclass:
        _name: Optional[str] = None

ALGORITHM = ChoiceEnum(["v1", "v2"])
# several norms joined by "_" apply left to right, in the official code's order
TARGET_LAYER_NORM = ChoiceEnum(["none", "instance", "layer", "batch", "batch_instance", "instance_layer", "batch_layer",
                                "batch_instance_layer"])
TARGET_FINAL_NORM = ChoiceEnum(["none", "instance", "layer", "layer_instance"])
LOSS = ChoiceEnum(["l2", "smooth_l1"])
MASK_TYPE = ChoiceEnum(["block", "span"])
IMAGE_MASK_TYPE = ChoiceEnum(["inverse_block", "block", "beit"])
TEXT_MASK_TYPE = ChoiceEnum(["random", "span"])
EXTRACTOR_MODE = ChoiceEnum(["layer_norm", "group_norm"])


@dataclass
class AudioEncoderConfig(FairseqDataclass):
    audio_conv_feature_layers: str = field(
        default="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2",
        metadata={"help": "conv feature extractor: '+'-joined lists of (dim, kernel, stride) tuples with optional "
                          "'* repeat'; the default is wav2vec 2.0's (stride 320 = 20 ms frames at 16 kHz)"},
    )
    audio_extractor_mode: EXTRACTOR_MODE = field(
        default="layer_norm",
        metadata={"help": "norm in the conv extractor: layer_norm after every conv (data2vec; needs normalised "
                          "waveforms) or group_norm after the first only"},
    )
    audio_feature_grad_mult: float = field(
        default=1.0, metadata={"help": "gradient multiplier for the conv extractor; 0 freezes it (no_grad)"}
    )
    audio_conv_pos_width: int = field(
        default=95, metadata={"help": "total width (frames) of the conv positional encoder; kernel = width // depth"}
    )
    audio_conv_pos_depth: int = field(default=5, metadata={"help": "conv layers in the positional encoder"})
    audio_conv_pos_groups: int = field(default=16, metadata={"help": "groups of the positional convolutions"})
    audio_prenet_depth: int = field(
        default=0, metadata={"help": "speech-only Transformer blocks before the shared blocks (v2 large: 8)"}
    )
    audio_prenet_dropout: float = field(
        default=0.1, metadata={"help": "dropout after the context LayerNorm, before the prenet blocks"}
    )
    audio_use_alibi: bool = field(
        default=True, metadata={"help": "ALiBi attention bias over frame distance (data2vec 2.0 speech); v1: false"}
    )
    audio_alibi_learned_scale: bool = field(
        default=True, metadata={"help": "learn one non-negative scale per head for the ALiBi bias"}
    )
    audio_mask_type: MASK_TYPE = field(
        default="block",
        metadata={"help": "block: exact-count blocks (data2vec 2.0); span: overlapping spans from random "
                          "starts (data2vec 1.0 / wav2vec 2.0)"},
    )
    audio_mask_prob: float = field(
        default=0.5,
        metadata={"help": "block: fraction of frames masked (v2 base 0.5, large 0.55); span: probability of a "
                          "frame starting a span (v1: 0.65)"},
    )
    audio_mask_length: int = field(default=5, metadata={"help": "frames per block / span (v2: 5, v1: 10)"})
    audio_mask_prob_adjust: float = field(
        default=0.05, metadata={"help": "block: extra block centres drawn before trimming to the exact count"}
    )
    audio_decoder_dim: int = field(default=384, metadata={"help": "v2 decoder width (base 384, large 768)"})
    audio_decoder_kernel: int = field(default=7, metadata={"help": "v2 decoder conv kernel (frames)"})
    audio_decoder_layers: int = field(default=4, metadata={"help": "v2 decoder conv layers"})
    audio_decoder_groups: int = field(default=16, metadata={"help": "v2 decoder conv groups"})
    audio_decoder_residual: bool = field(
        default=True, metadata={"help": "residual connections between decoder layers of equal width"}
    )
    audio_decoder_projection_layers: int = field(
        default=1, metadata={"help": "linear layers projecting the decoder output back to embed_dim"}
    )
    audio_decoder_projection_ratio: float = field(
        default=2.0, metadata={"help": "width multiplier of the first projection layer when there are several"}
    )


@dataclass
class ImageEncoderConfig(FairseqDataclass):
    image_input_size: int = field(default=224, metadata={"help": "image side in pixels (square inputs)"})
    image_patch_size: int = field(default=16, metadata={"help": "patch side in pixels (huge: 14)"})
    image_in_chans: int = field(default=3, metadata={"help": "input channels (images are decoded as RGB)"})
    image_prenet_depth: int = field(
        default=2, metadata={"help": "image-only Transformer blocks before the shared blocks (v2 base: 2 + depth 10)"}
    )
    image_prenet_dropout: float = field(default=0.0, metadata={"help": "dropout before the prenet blocks"})
    image_num_extra_tokens: int = field(default=1, metadata={"help": "learned tokens prepended to the patches (CLS)"})
    image_mask_type: IMAGE_MASK_TYPE = field(
        default="inverse_block",
        metadata={"help": "inverse_block: blocks of visible patches, rest masked (data2vec 2.0); block: blocks "
                          "of masked patches; beit: BEiT rectangles (data2vec 1.0)"},
    )
    image_mask_prob: float = field(
        default=0.8, metadata={"help": "fraction of patches masked (v2 base 0.8, large 0.75; v1 0.6)"}
    )
    image_mask_length: int = field(
        default=3, metadata={"help": "block side in patches (v2: 3); beit: smallest rectangle in patches (16)"}
    )
    image_mask_prob_adjust: float = field(
        default=0.07, metadata={"help": "extra block centres drawn before trimming to the exact count"}
    )
    image_ema_local_encoder: bool = field(
        default=True, metadata={"help": "v2: the teacher keeps its own EMA patch embedding (data2vec 1.0 teachers share the student's)"}
    )
    image_cls_loss: float = field(
        default=0.01, metadata={"help": "weight of the v2 CLS loss: student CLS output vs mean target; 0 disables"}
    )
    image_decoder_dim: int = field(default=768, metadata={"help": "v2 decoder width (base 768, large 1024)"})
    image_decoder_kernel: int = field(default=3, metadata={"help": "v2 decoder 2-D conv kernel (patches)"})
    image_decoder_layers: int = field(default=6, metadata={"help": "v2 decoder conv layers (base 6, large 3)"})
    image_decoder_groups: int = field(default=16, metadata={"help": "v2 decoder conv groups"})
    image_decoder_residual: bool = field(
        default=True, metadata={"help": "residual connections between decoder layers of equal width"}
    )
    image_decoder_projection_layers: int = field(
        default=1, metadata={"help": "linear layers projecting the decoder output back to embed_dim"}
    )
    image_decoder_projection_ratio: float = field(
        default=2.0, metadata={"help": "width multiplier of the first projection layer when there are several"}
    )


@dataclass
class TextEncoderConfig(FairseqDataclass):
    text_vocab_size: int = field(default=0, metadata={"help": "dictionary size; set by the text tasks from dict.txt"})
    text_pad_index: int = field(default=1, metadata={"help": "padding token id (fairseq dictionaries: 1)"})
    text_mask_index: int = field(
        default=-1, metadata={"help": "id of <mask> (v1 student input); set by the text tasks from the dictionary"}
    )
    text_max_positions: int = field(default=512, metadata={"help": "longest token sequence (learned positions)"})
    text_dropout: float = field(default=0.1, metadata={"help": "dropout after the embedding LayerNorm"})
    text_prenet_depth: int = field(default=0, metadata={"help": "text-only Transformer blocks before the shared blocks"})
    text_prenet_dropout: float = field(default=0.0, metadata={"help": "dropout before the prenet blocks"})
    text_mask_type: TEXT_MASK_TYPE = field(
        default="random", metadata={"help": "random: exactly int(n * p) real tokens per sentence (v2); span (v1 variant)"}
    )
    text_mask_prob: float = field(default=0.48, metadata={"help": "fraction of tokens masked (v2 base 0.48, large 0.5)"})
    text_mask_length: int = field(default=1, metadata={"help": "span length (random masking: 1)"})
    text_keep_ends: bool = field(
        default=False,
        metadata={"help": "never mask a block's first and last position (<s>, </s>); false: every position can be masked, "
                          "as in the official code and fairseq's masked LM (<s> then gets targets, and its output is what "
                          "sentence classifiers read)"},
    )
    text_mask_prob_adjust: float = field(
        default=0.0, metadata={"help": "unused: no text mask type draws extra blocks (kept so older configs load)"}
    )
    text_leave_unmasked_prob: float = field(
        default=0.1, metadata={"help": "v1: share of masked positions the student sees unchanged (BERT 0.1; span variant 0)"}
    )
    text_random_token_prob: float = field(
        default=0.1, metadata={"help": "v1: share of masked positions given a random word (BERT 0.1; span variant 0); "
                                       "the rest become <mask>"}
    )
    text_ema_encoder_only: bool = field(
        default=True, metadata={"help": "v2: the teacher is an EMA of the shared blocks only, fed the student's embeddings"}
    )
    text_decoder_dim: int = field(default=768, metadata={"help": "v2 decoder width"})
    text_decoder_kernel: int = field(default=9, metadata={"help": "v2 decoder conv kernel (tokens)"})
    text_decoder_layers: int = field(default=5, metadata={"help": "v2 decoder conv layers"})
    text_decoder_groups: int = field(default=1, metadata={"help": "v2 decoder conv groups"})
    text_decoder_residual: bool = field(default=False, metadata={"help": "residual connections in the decoder (text: no)"})
    text_decoder_projection_layers: int = field(
        default=2, metadata={"help": "linear layers projecting the decoder output back to embed_dim (text: 2)"}
    )
    text_decoder_projection_ratio: float = field(
        default=2.0, metadata={"help": "width multiplier of the first projection layer"}
    )


@dataclass
class D2vMultiConfig(TextEncoderConfig, ImageEncoderConfig, AudioEncoderConfig):
    algorithm: ALGORITHM = field(
        default="v2",
        metadata={"help": "v1: data2vec 1.0 (student sees the whole masked input, mask embeddings, linear "
                          "head); v2: data2vec 2.0 (student skips masked tokens, conv decoder, multi-mask)"},
    )
    modalities: str = field(
        default="audio", metadata={"help": "comma-separated modality encoders to build (audio, image, text)"}
    )
    depth: int = field(default=12, metadata={"help": "shared Transformer blocks (Base 12, Large 24)"})
    embed_dim: int = field(default=768, metadata={"help": "model dimension D (Base 768, Large 1024)"})
    num_heads: int = field(default=12, metadata={"help": "attention heads; must divide embed_dim"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "FFN width / embed_dim"})
    norm_eps: float = field(default=1e-5, metadata={"help": "LayerNorm epsilon of the blocks"})
    layer_norm_first: bool = field(
        default=False, metadata={"help": "pre-LN blocks; the reference's speech/text models are post-LN (false)"}
    )
    encoder_dropout: float = field(default=0.1, metadata={"help": "dropout after the attention projection"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention probabilities"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout inside the FFN"})
    post_mlp_dropout: float = field(default=0.1, metadata={"help": "dropout on the FFN output before the residual"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the input of the shared blocks"})
    layerdrop: float = field(default=0.05, metadata={"help": "probability of skipping a student block in training"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth of the last block (linear from 0)"})
    clone_batch: int = field(
        default=8,
        metadata={"help": "masked views per sample sharing one teacher pass (v2 speech base 8, large 12; v1: 1)"},
    )
    mask_noise_std: float = field(
        default=0.01, metadata={"help": "std of the noise the v2 decoder sees at masked positions"}
    )
    decoder_input_dropout: float = field(
        default=0.1, metadata={"help": "dropout on the student output before the v2 decoder"}
    )
    average_top_k_layers: int = field(
        default=8, metadata={"help": "K: targets average the FFN outputs of the teacher's top K blocks"}
    )
    target_layer_norm: TARGET_LAYER_NORM = field(
        default="instance",
        metadata={"help": "per-layer target normalisation: instance (over time; speech), layer (over "
                          "channels; v1 text), batch, none, or a combination applied left to right "
                          "(instance_layer = instance, then layer)"},
    )
    target_final_norm: TARGET_FINAL_NORM = field(
        default="none",
        metadata={"help": "normalisation of the averaged target: none, instance, layer (images), layer_instance "
                          "(layer, then instance)"},
    )
    padding_aware: bool = field(
        default=True,
        metadata={"help": "exclude padded positions from target statistics and zero them before the "
                          "positional conv; false reproduces the reference bit for bit"},
    )
    head_layers: int = field(
        default=1, metadata={"help": "v1 regression head: 1 = Linear(D, D) (speech); 2 = Linear(D, 2D), GELU, Linear(2D, D) (text)"}
    )
    loss: LOSS = field(default="l2", metadata={"help": "regression loss: l2 or smooth_l1"})
    loss_beta: float = field(default=1.0, metadata={"help": "Smooth-L1 beta (v1 text: 4); unused by l2"})
    loss_scale: Optional[float] = field(
        default=None, metadata={"help": "loss multiplier, > 0; null = 1/sqrt(embed_dim) (text uses 1)"}
    )
    ema_decay: float = field(default=0.999, metadata={"help": "tau0: teacher EMA decay at update 0"})
    ema_end_decay: float = field(default=0.99999, metadata={"help": "tau_e: decay after annealing"})
    ema_anneal_end_step: int = field(
        default=75000, metadata={"help": "tau_n: updates over which the decay moves linearly tau0 -> tau_e"}
    )
    ema_copy_pos_conv: bool = field(
        default=False,
        metadata={"help": "copy the positional conv into the teacher instead of averaging it (data2vec 1.0 speech)"},
    )
    compile_blocks: bool = field(
        default=False,
        metadata={"help": "run the shared Transformer blocks (student and teacher) through torch.compile; if "
                          "compiling fails the model logs a warning and runs them eagerly"},
    )
    ema_sync_check_interval: int = field(
        default=1000,
        metadata={"help": "multi-process training: every N updates check that all ranks hold the same teacher "
                          "(one all-reduce of per-tensor sums) and stop with an error if not; 0 disables"},
    )
    min_target_var: float = field(
        default=0.1, metadata={"help": "collapse check: minimum target standard deviation (mean over channels; the "
                                       "reference's name says var); 0 disables"}
    )
    min_pred_var: float = field(
        default=0.01, metadata={"help": "collapse check: minimum prediction standard deviation (mean over channels); "
                                        "0 disables"}
    )
    collapse_check_start_update: int = field(
        default=5000, metadata={"help": "first update at which the collapse check runs (reference: 5000)"}
    )
    collapse_patience: int = field(
        default=10, metadata={"help": "consecutive updates below the thresholds before training stops"}
    )
