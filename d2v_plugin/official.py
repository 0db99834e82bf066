"""Official fairseq data2vec weights, configs and training recipes, mapped onto ``d2v_multi``.

Families: ``data2vec2`` (``data2vec_multi``, speech, images or text), ``data2vec1_audio``
(``data2vec_audio``), ``data2vec1_text`` (``data2vec_text``) and ``roberta`` (fairseq's own
RoBERTa masked LM, the same post-LN encoder as data2vec 1.0 text: its encoder converts to a
``d2v_multi`` v1 text model whose regression head is freshly initialised, so RoBERTa can be
fine-tuned, probed and extracted exactly like a data2vec model; its LM head is dropped) and
``mae`` (the official masked autoencoder of ``examples/data2vec``: its timm ViT encoder converts
to a pre-LN ``d2v_multi`` v2 image model, its pixel decoder is dropped).
The converted config sets ``padding_aware=false`` so a converted model computes exactly
what the official code computes.
"""
from __future__ import annotations

import argparse
import logging
import re
from typing import Dict, List, Tuple

import torch

Rules = List[Tuple[str, str]]
logger = logging.getLogger(__name__)

_AUDIO = "modality_encoders.audio."
_IMAGE = "modality_encoders.image."
_TEXT = "modality_encoders.text."


def _conv_extractor_rules(official_prefix: str) -> Rules:
    """wav2vec ConvFeatureExtractionModel keys (conv_layers.i.{0: conv, 2.1: LayerNorm | 2: GroupNorm})."""
    src = "^" + re.escape(official_prefix) + r"conv_layers\.(\d+)\."
    dst = _AUDIO + r"feature_extractor.layers.\1."
    return [(src + r"0\.", dst + "conv."), (src + r"2\.1\.", dst + "norm."), (src + r"2\.", dst + "norm.")]


V2_RULES: Rules = _conv_extractor_rules("modality_encoders.AUDIO.local_encoder.") + [
    (r"^modality_encoders\.AUDIO\.project_features\.1\.", _AUDIO + "project.norm."),
    (r"^modality_encoders\.AUDIO\.project_features\.2\.", _AUDIO + "project.linear."),
    (r"^modality_encoders\.AUDIO\.relative_positional_encoder\.(\d+)\.0\.", _AUDIO + r"pos_conv.layers.<\1-1>."),
    (r"^modality_encoders\.AUDIO\.context_encoder\.", _AUDIO + "context."),
    (r"^modality_encoders\.AUDIO\.decoder\.blocks\.(\d+)\.0\.", _AUDIO + r"decoder.layers.\1."),
    (r"^modality_encoders\.AUDIO\.decoder\.proj\.", _AUDIO + "decoder.proj."),
    (r"^modality_encoders\.AUDIO\.alibi_scale$", _AUDIO + "alibi_scale"),
    (r"^modality_encoders\.IMAGE\.local_encoder\.proj\.", _IMAGE + "patch_embed.proj."),
    (r"^modality_encoders\.IMAGE\.fixed_positional_encoder\.positions$", _IMAGE + "positions"),
    (r"^modality_encoders\.IMAGE\.extra_tokens$", _IMAGE + "extra_tokens"),
    (r"^modality_encoders\.IMAGE\.context_encoder\.", _IMAGE + "context."),
    (r"^modality_encoders\.IMAGE\.decoder\.blocks\.(\d+)\.0\.", _IMAGE + r"decoder.layers.\1."),
    (r"^modality_encoders\.IMAGE\.decoder\.proj\.", _IMAGE + "decoder.proj."),
    (r"^modality_encoders\.TEXT\.local_encoder\.", _TEXT),
    (r"^modality_encoders\.TEXT\.context_encoder\.", _TEXT + "context."),
    (r"^modality_encoders\.TEXT\.decoder\.blocks\.(\d+)\.0\.", _TEXT + r"decoder.layers.\1."),
    (r"^modality_encoders\.TEXT\.decoder\.proj\.", _TEXT + "decoder.proj."),
    (r"^blocks\.", "blocks."),
    (r"^norm\.", "norm."),  # pre-LN models only: the LayerNorm after the last block
]

def _fairseq_layer_rules(official_prefix: str) -> Rules:
    """Post-LN fairseq encoder layers (MultiheadAttention with separate q/k/v) -> shared blocks."""
    src = "^" + re.escape(official_prefix) + r"layers\.(\d+)\."
    return [
        (src + r"self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (src + r"self_attn\.([qkv])_proj\.", r"blocks.\1.attn.\2_proj."),  # fused below
        (src + r"self_attn_layer_norm\.", r"blocks.\1.norm1."),
        (src + r"fc1\.", r"blocks.\1.mlp.fc1."),
        (src + r"fc2\.", r"blocks.\1.mlp.fc2."),
        (src + r"final_layer_norm\.", r"blocks.\1.norm2."),
    ]


V1_AUDIO_RULES: Rules = _conv_extractor_rules("feature_extractor.") + _fairseq_layer_rules("encoder.") + [
    (r"^mask_emb$", _AUDIO + "mask_emb"),
    (r"^layer_norm\.", _AUDIO + "project.norm."),
    (r"^post_extract_proj\.", _AUDIO + "project.linear."),
    (r"^encoder\.pos_conv\.(\d+)\.0\.", _AUDIO + r"pos_conv.layers.\1."),
    (r"^encoder\.layer_norm\.", _AUDIO + "context.norm."),
    (r"^final_proj\.", "final_proj."),
]

V1_TEXT_RULES: Rules = _fairseq_layer_rules("encoder.sentence_encoder.") + [
    (r"^encoder\.sentence_encoder\.(embed_tokens|embed_positions|layernorm_embedding)\.", _TEXT + r"\1."),
    (r"^encoder\.regression_head\.", "final_proj."),
]

ROBERTA_RULES: Rules = V1_TEXT_RULES[:-1]

MAE_RULES: Rules = [  # timm's PatchEmbed and Block keys; the pixel decoder is dropped
    (r"^patch_embed\.proj\.", _IMAGE + "patch_embed.proj."),
    (r"^cls_token$", _IMAGE + "extra_tokens"),
    (r"^pos_embed$", _IMAGE + "positions"),
    (r"^blocks\.", "blocks."),
    (r"^norm\.", "norm."),
]
MAE_DECODER = re.compile(r"^(decoder_|mask_token$)")

FAMILIES = ("data2vec2", "data2vec1_audio", "data2vec1_text", "roberta", "mae")
IGNORED = re.compile(r"(^|\.)version$|^_ema$|^encoder\._ema$|^encoder\.lm_head\.")


def _rename(key: str, rules: Rules) -> str:
    for pattern, repl in rules:
        if re.search(pattern, key):
            new = re.sub(pattern, repl, key)
            return re.sub(r"<(\d+)-1>", lambda m: str(int(m.group(1)) - 1), new)
    raise KeyError(f"no d2v_plugin counterpart for official weight {key!r}")


def _fuse_qkv(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Separate q/k/v projections (fairseq MultiheadAttention) -> one qkv Linear."""
    out = {k: v for k, v in sd.items() if not re.search(r"\.attn\.[qkv]_proj\.", k)}
    for k in sd:
        m = re.match(r"(.*\.attn\.)q_proj\.(weight|bias)$", k)
        if m:
            out[f"{m.group(1)}qkv.{m.group(2)}"] = torch.cat([sd[f"{m.group(1)}{p}_proj.{m.group(2)}"] for p in "qkv"])
    return out


def _convert(sd: Dict[str, torch.Tensor], rules: Rules, prefix: str = "") -> Dict[str, torch.Tensor]:
    out = {_rename(prefix + k, rules): v for k, v in sd.items() if not IGNORED.search(prefix + k)}
    out = _fuse_qkv(out)
    if _AUDIO + "alibi_scale" in out:
        out[_AUDIO + "alibi_scale"] = out[_AUDIO + "alibi_scale"].reshape(-1)  # (1,1,H,1,1) -> (H,)
    return out


def convert_state_dict(sd: Dict, family: str) -> Dict:
    """Official ``model`` state dict (with its ``_ema`` teacher) -> d2v_multi state dict."""
    if family == "data2vec2":
        # ema_encoder_only (text): the teacher dict holds the blocks without their prefix
        text_teacher = sd.get("_ema") is not None and any(re.match(r"^\d+\.", k) for k in sd["_ema"])
        rules, ema_prefix = V2_RULES, "blocks." if text_teacher else ""
    elif family == "data2vec1_audio":
        rules, ema_prefix = V1_AUDIO_RULES, "encoder."  # v1 teacher keys are relative to the encoder
    elif family == "data2vec1_text":
        rules, ema_prefix = V1_TEXT_RULES, "encoder.sentence_encoder."
    elif family == "roberta":
        rules, ema_prefix = ROBERTA_RULES, ""
    elif family == "mae":
        return _mae_state(sd)
    else:
        raise ValueError(f"unsupported checkpoint family {family!r} (supported: {', '.join(FAMILIES)})")
    out = _convert(sd, rules)
    if family == "data2vec1_text" and "final_proj.0.weight" in out and "final_proj.2.weight" not in out:
        out = {re.sub(r"^final_proj\.0\.", "final_proj.", k): v for k, v in out.items()}  # head_layers 1: one Linear
    ema = sd.get("_ema", sd.get("encoder._ema"))
    if ema is not None:  # the teacher's final norm is never used: targets are block outputs
        out["_ema"] = {k: v for k, v in _convert(ema, rules, ema_prefix).items() if not k.startswith("norm.")}
    return out


def _mae_state(sd: Dict) -> Dict:
    """MAE adds ``pos_embed[:, 0]`` to its CLS token and ``pos_embed[:, 1:]`` to the patches;
    d2v_multi adds positions to the patches only, so the CLS position folds into the token."""
    out = _convert({k: v for k, v in sd.items() if not MAE_DECODER.search(k)}, MAE_RULES)
    table = out[_IMAGE + "positions"]
    E = 1 if _IMAGE + "extra_tokens" in out else 0
    out[_IMAGE + "positions"] = table[:, E:].clone()
    if E:
        out[_IMAGE + "extra_tokens"] = out[_IMAGE + "extra_tokens"] + table[:, :E]
    return out


def _target_norms(c: Dict) -> Tuple[str, str]:
    """The official per-layer flags apply batch, then instance, then layer norm (any subset);
    the final flags layer, then instance."""
    if c.get("group_norm_target_layer"):
        raise ValueError("official group_norm_target_layer is not supported (per-layer norms: instance, layer, batch)")
    layer = "_".join(name for flag, name in (("batch_norm_target_layer", "batch"), ("instance_norm_target_layer", "instance"),
                                             ("layer_norm_target_layer", "layer")) if c.get(flag)) or "none"
    final = "_".join(name for flag, name in (("layer_norm_targets", "layer"), ("instance_norm_targets", "instance"))
                     if c.get(flag)) or "none"
    return layer, final


def _loss(c: Dict, family: str) -> Dict:
    """Official ``loss_beta`` 0 = L2, else Smooth-L1 with that beta. ``loss_scale``: data2vec 1.0
    text takes a value <= 0 as 1/sqrt(D) (and crashes on None); the other models take None as
    1/sqrt(D) and any value literally. d2v_plugin: None = 1/sqrt(D), else a positive factor."""
    beta = float(c.get("loss_beta") or 0.0)
    scale = c.get("loss_scale")
    if scale is not None and float(scale) <= 0:
        if family != "data2vec1_text":
            raise ValueError(f"official loss_scale={scale} makes the official loss {'zero' if scale == 0 else 'negative'}; "
                             "d2v_plugin needs a positive loss_scale (or null for 1/sqrt(D))")
        scale = None
    return {"loss": "l2" if beta == 0 else "smooth_l1", "loss_beta": beta or 1.0,
            "loss_scale": None if scale is None else float(scale)}


def convert_config(c: Dict, family: str, vocab_size: int = 0) -> Dict:
    """Official resolved model config (a plain dict) -> ``D2vMultiConfig`` fields;
    text models take the dictionary size (it is not in the model config)."""
    if family == "data2vec2":
        modality = str(c.get("supported_modality") or "AUDIO").lower()
        build = {"audio": _v2_audio_config, "image": _v2_image_config}.get(modality)
        if modality == "text":
            return _v2_text_config(c, vocab_size)
        if build is None:
            raise ValueError(f"data2vec 2.0 {modality} checkpoints are not supported (audio, image, text)")
        return build(c)
    if family == "data2vec1_audio":
        return _v1_audio_config(c)
    if family == "data2vec1_text":
        return _v1_text_config(c, vocab_size)
    if family == "roberta":
        return _roberta_config(c, vocab_size)
    if family == "mae":
        return _mae_config(c)
    raise ValueError(f"unsupported config family {family!r}")


# Official data2vec 2.0 settings with no d2v_plugin counterpart, and the value d2v_plugin reproduces.
# A different value that changes the forward is refused; one that changes only how a model would
# be trained from this config is named in a warning (the weights still convert exactly).
_V2_FORWARD_ONLY = {"norm_affine": True}
_V2_TRAINING_ONLY = {"start_drop_path_rate": 0.0, "end_of_block_targets": False, "shared_decoder": None,
                     "recon_loss": 0.0, "d2v_loss": 1.0, "decoder_group": False, "mae_init": False}
_MODALITY_TRAINING_ONLY = {"prenet_layerdrop": 0.0, "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0,
                           "mask_prob_min": None, "keep_masked_pct": 0.0, "add_masks": False, "remove_masks": False,
                           "mask_dropout": 0.0, "encoder_zero_mask": True, "mask_channel_prob": 0.0}


def _check_unsupported(c: Dict, m: Dict) -> None:
    def differs(d, table):
        return [f"{k}={d[k]!r}" for k, v in table.items() if k in d and d[k] != v and not (
            isinstance(v, float) and isinstance(d[k], (int, float)) and float(d[k]) == v)]

    refused = differs(c, _V2_FORWARD_ONLY)
    if refused:
        raise ValueError(f"official setting(s) {', '.join(refused)} have no d2v_plugin counterpart")
    ignored = differs(c, _V2_TRAINING_ONLY) + [f"modality {x}" for x in differs(m, _MODALITY_TRAINING_ONLY)]
    if ignored:
        logger.warning("official setting(s) %s are not reproduced by d2v_plugin: the converted weights compute the "
                       "same features, but training from this config differs there", ", ".join(ignored))


def _v2_shared(c: Dict, m: Dict) -> Dict:
    """Settings every data2vec 2.0 modality shares; m: the modality's config."""
    _check_unsupported(c, m)
    layer, final = _target_norms(c)
    return dict(
        algorithm="v2", depth=c["depth"], embed_dim=c["embed_dim"], num_heads=c["num_heads"],
        mlp_ratio=c["mlp_ratio"], norm_eps=c["norm_eps"], layer_norm_first=c["layer_norm_first"],
        encoder_dropout=c["encoder_dropout"], attention_dropout=c["attention_dropout"],
        activation_dropout=c["activation_dropout"], post_mlp_dropout=c["post_mlp_drop"], dropout_input=c["dropout_input"],
        layerdrop=c["layerdrop"], drop_path=c["end_drop_path_rate"], clone_batch=c["clone_batch"],
        average_top_k_layers=c["average_top_k_layers"], target_layer_norm=layer, target_final_norm=final,
        padding_aware=False, ema_decay=c["ema_decay"], ema_end_decay=c["ema_end_decay"],
        ema_anneal_end_step=c["ema_anneal_end_step"], min_target_var=c["min_target_var"], min_pred_var=c["min_pred_var"],
        mask_noise_std=m["mask_noise_std"], decoder_input_dropout=m["decoder"]["input_dropout"], **_loss(c, "data2vec2"),
    )


def _decoder(prefix: str, dec: Dict) -> Dict:
    keys = ("dim", "kernel", "layers", "groups", "residual")
    out = {f"{prefix}_decoder_{k}": dec[f"decoder_{k}"] for k in keys}
    out[f"{prefix}_decoder_projection_layers"] = dec["projection_layers"]
    out[f"{prefix}_decoder_projection_ratio"] = dec["projection_ratio"]
    return out


def _v2_audio_config(c: Dict) -> Dict:
    a = c["modalities"]["audio"]
    if c.get("ema_encoder_only") or a.get("ema_local_encoder") or a.get("learned_alibi_scale_per_layer"):
        raise ValueError("speech checkpoints with ema_local_encoder / per-layer ALiBi scales are not supported")
    if a.get("use_alibi_encoder") and a.get("learned_alibi_scale") and not a.get("learned_alibi_scale_per_head"):
        raise ValueError("learned_alibi_scale_per_head=false (one ALiBi scale for all heads) is not supported; "
                         "d2v_plugin learns one scale per head (the official base and large recipes)")
    if a.get("use_alibi_encoder") and not a.get("learned_alibi_scale") and float(a.get("alibi_scale", 1.0)) != 1.0:
        raise ValueError(f"a fixed ALiBi scale of {a.get('alibi_scale')} is not supported (fixed: 1.0, or learned per head)")
    if a.get("learned_alibi"):
        raise ValueError("learned ALiBi biases (learned_alibi=true) are not supported")
    return dict(
        _v2_shared(c, a), modalities="audio",
        audio_conv_feature_layers=a["feature_encoder_spec"], audio_extractor_mode=a["extractor_mode"],
        audio_feature_grad_mult=a["local_grad_mult"], audio_conv_pos_width=a["conv_pos_width"],
        audio_conv_pos_depth=a["conv_pos_depth"], audio_conv_pos_groups=a["conv_pos_groups"],
        audio_prenet_depth=a["prenet_depth"], audio_prenet_dropout=a["prenet_dropout"],
        audio_use_alibi=a["use_alibi_encoder"], audio_alibi_learned_scale=a["learned_alibi_scale"],
        audio_mask_type="block", audio_mask_prob=a["mask_prob"], audio_mask_length=a["mask_length"],
        audio_mask_prob_adjust=a["mask_prob_adjust"], **_decoder("audio", a["decoder"]),
    )


def _v2_image_config(c: Dict) -> Dict:
    i = c["modalities"]["image"]
    separate_width = i.get("embed_dim", c["embed_dim"]) != c["embed_dim"]
    if c.get("ema_encoder_only") or i.get("use_alibi_encoder") or not i.get("fixed_positions", True) or separate_width:
        raise ValueError("image checkpoints with ALiBi, learned positions or a separate patch width are not supported")
    return dict(
        _v2_shared(c, i), modalities="image",
        image_input_size=i["input_size"], image_patch_size=i["patch_size"], image_in_chans=i["in_chans"],
        image_prenet_depth=i["prenet_depth"], image_prenet_dropout=i["prenet_dropout"],
        image_num_extra_tokens=i["num_extra_tokens"], image_mask_type="inverse_block" if i["inverse_mask"] else "block",
        image_mask_prob=i["mask_prob"], image_mask_length=i["mask_length"], image_mask_prob_adjust=i["mask_prob_adjust"],
        image_ema_local_encoder=i["ema_local_encoder"], image_cls_loss=c.get("cls_loss", 0.0),
        **_decoder("image", i["decoder"]),
    )


def _v2_text_config(c: Dict, vocab_size: int) -> Dict:
    t = c["modalities"]["text"]
    if not t.get("learned_pos", True) or not t.get("no_scale_embedding", True) or not t.get("layernorm_embedding", True):
        raise ValueError("text checkpoints without learned positions / with embedding scaling are not supported")
    if vocab_size <= 0:
        raise ValueError("converting a text model needs the dictionary size (vocab_size)")
    return dict(
        _v2_shared(c, t), modalities="text", text_vocab_size=vocab_size, text_max_positions=t["max_source_positions"],
        text_dropout=t["dropout"], text_prenet_depth=t["prenet_depth"], text_prenet_dropout=t["prenet_dropout"],
        text_mask_type="random", text_mask_prob=t["mask_prob"], text_mask_length=1,
        text_ema_encoder_only=c["ema_encoder_only"], **_decoder("text", t["decoder"]),
    )


def _v1_audio_config(c: Dict) -> Dict:
    layer, final = _target_norms(c)
    if c.get("pos_conv_depth", 1) < 2:
        raise ValueError("data2vec 1.0 checkpoints with a single weight-normed positional conv are not supported")
    return dict(
        algorithm="v1", modalities="audio", depth=c["encoder_layers"], embed_dim=c["encoder_embed_dim"],
        num_heads=c["encoder_attention_heads"], mlp_ratio=c["encoder_ffn_embed_dim"] / c["encoder_embed_dim"],
        norm_eps=1e-5, layer_norm_first=c["layer_norm_first"], encoder_dropout=c["dropout"],
        attention_dropout=c["attention_dropout"], activation_dropout=c["activation_dropout"],
        post_mlp_dropout=c["dropout"], dropout_input=0.0, layerdrop=c["encoder_layerdrop"], clone_batch=1,
        average_top_k_layers=c["average_top_k_layers"], target_layer_norm=layer, target_final_norm=final,
        padding_aware=False, ema_decay=c["ema_decay"], ema_end_decay=c["ema_end_decay"],
        ema_anneal_end_step=c["ema_anneal_end_step"], ema_copy_pos_conv=True,
        min_target_var=c.get("min_target_var", 0.1), min_pred_var=c.get("min_pred_var", 0.01),
        audio_conv_feature_layers=c["conv_feature_layers"], audio_extractor_mode=c["extractor_mode"],
        audio_feature_grad_mult=c["feature_grad_mult"], audio_conv_pos_width=c["conv_pos"],
        audio_conv_pos_depth=c["pos_conv_depth"], audio_conv_pos_groups=c["conv_pos_groups"], audio_prenet_depth=0,
        audio_prenet_dropout=c["dropout"], audio_use_alibi=False, audio_mask_type="span",
        audio_mask_prob=c["mask_prob"], audio_mask_length=c["mask_length"], **_loss(c, "data2vec1_audio"),
    )


def _v1_text_config(c: Dict, vocab_size: int) -> Dict:
    """data2vec_text (RoBERTa-style post-LN encoder). Masking lives in the official task, so
    the converted config takes the official base recipe: spans of 4 tokens, p = 0.35, all
    ``<mask>``; ``<mask>`` is the last dictionary entry (the official task appends it)."""
    t, e = c["transformer"], c["transformer"]["encoder"]
    layer, final = _target_norms(c)
    if e["normalize_before"] or not e["learned_pos"] or not t["no_scale_embedding"] or not t["layernorm_embedding"]:
        raise ValueError("data2vec 1.0 text checkpoints need post-LN layers, learned positions, no embedding scaling "
                         "and the embedding LayerNorm (the official base/large settings)")
    if not c.get("ema_transformer_layers_only", True):
        raise ValueError("data2vec 1.0 text checkpoints whose teacher averages the embeddings are not supported")
    if vocab_size <= 0:
        raise ValueError("converting a text model needs the dictionary size (vocab_size)")
    return dict(
        algorithm="v1", modalities="text", depth=e["layers"], embed_dim=e["embed_dim"], num_heads=e["attention_heads"],
        mlp_ratio=e["ffn_embed_dim"] / e["embed_dim"], norm_eps=1e-5, layer_norm_first=False,
        encoder_dropout=t["dropout"], attention_dropout=t["attention_dropout"], activation_dropout=t["activation_dropout"],
        post_mlp_dropout=t["dropout"], dropout_input=0.0, layerdrop=e["layerdrop"], clone_batch=1,
        average_top_k_layers=c["average_top_k_layers"], target_layer_norm=layer, target_final_norm=final,
        padding_aware=False, ema_decay=c["ema_decay"], ema_end_decay=c["ema_end_decay"],
        ema_anneal_end_step=c["ema_anneal_end_step"], head_layers=c["head_layers"],
        min_target_var=c.get("min_target_var", 0.1), min_pred_var=c.get("min_pred_var", 0.01),
        text_vocab_size=vocab_size, text_mask_index=vocab_size - 1, text_max_positions=t["max_source_positions"],
        text_dropout=t["dropout"], text_prenet_depth=0, text_mask_type="span", text_mask_prob=0.35, text_mask_length=4,
        text_leave_unmasked_prob=0.0, text_random_token_prob=0.0, **_loss(c, "data2vec1_text"),
    )


def _roberta_config(c: Dict, vocab_size: int) -> Dict:
    """fairseq ``roberta`` (argparse-style flat config): the encoder as data2vec 1.0 text; the
    pretraining settings (targets, loss, EMA, masking) are the official data2vec 1.0 text base
    recipe, for whoever continues with data2vec pretraining from RoBERTa weights."""
    if (c.get("encoder_normalize_before") or not c.get("encoder_learned_pos", True) or not c.get("no_scale_embedding", True)
            or not c.get("layernorm_embedding", True) or c.get("activation_fn", "gelu") != "gelu"):
        raise ValueError("RoBERTa checkpoints need post-LN layers, learned positions, no embedding scaling, the "
                         "embedding LayerNorm and GELU (fairseq's roberta architectures)")
    if vocab_size <= 0:
        raise ValueError("converting a text model needs the dictionary size (vocab_size)")
    depth = int(c["encoder_layers"])
    dropout = float(c.get("dropout", 0.1))
    return dict(
        algorithm="v1", modalities="text", depth=depth, embed_dim=c["encoder_embed_dim"],
        num_heads=c["encoder_attention_heads"], mlp_ratio=c["encoder_ffn_embed_dim"] / c["encoder_embed_dim"],
        norm_eps=1e-5, layer_norm_first=False, encoder_dropout=dropout,
        attention_dropout=float(c.get("attention_dropout", 0.1)), activation_dropout=float(c.get("activation_dropout", 0.0)),
        post_mlp_dropout=dropout, dropout_input=0.0, layerdrop=float(c.get("encoder_layerdrop", 0.0)), clone_batch=1,
        average_top_k_layers=min(10, depth), target_layer_norm="layer", target_final_norm="none", padding_aware=False,
        ema_decay=0.999, ema_end_decay=0.9999, ema_anneal_end_step=300000, head_layers=2,
        min_target_var=0.1, min_pred_var=0.01, text_vocab_size=vocab_size, text_mask_index=vocab_size - 1,
        text_max_positions=int(c.get("max_positions", c.get("tokens_per_sample", 512))), text_dropout=dropout,
        text_prenet_depth=0, text_mask_type="span", text_mask_prob=0.35, text_mask_length=4,
        text_leave_unmasked_prob=0.0, text_random_token_prob=0.0, loss="smooth_l1", loss_beta=4.0, loss_scale=1.0,
    )


def _mae_config(c: Dict) -> Dict:
    """The official ``mae`` (timm ViT blocks: pre-LN, final LayerNorm, fixed sin-cos positions,
    one CLS token): its encoder as a pre-LN data2vec 2.0 image model. The pixel decoder has no
    counterpart; the data2vec 2.0 settings (targets, EMA, conv decoder) are d2v_multi's defaults,
    and the masking keeps MAE's ratio, for whoever continues with data2vec pretraining."""
    other = [k for k in ("w2v_block", "alt_block", "alt_block2", "alt_attention", "use_rel_pos_bias") if c.get(k)]
    if other:
        raise ValueError(f"MAE checkpoints with {', '.join(other)} are not supported (timm ViT blocks only)")
    return dict(
        algorithm="v2", modalities="image", depth=c["depth"], embed_dim=c["embed_dim"], num_heads=c["num_heads"],
        mlp_ratio=float(c["mlp_ratio"]), norm_eps=c["norm_eps"], layer_norm_first=True, encoder_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, post_mlp_dropout=0.0, dropout_input=0.0, layerdrop=0.0,
        drop_path=c.get("drop_path_rate", 0.0), padding_aware=False, average_top_k_layers=min(3, c["depth"]),
        image_input_size=c["input_size"], image_patch_size=c["patch_size"], image_in_chans=c["in_chans"],
        image_prenet_depth=0, image_num_extra_tokens=0 if c.get("no_cls") else 1, image_mask_prob=c["mask_ratio"],
    )


def _fresh_pretraining_weights(cfg: Dict, state: Dict) -> Dict:
    """The weights a d2v_multi model of ``cfg`` has but ``state`` lacks (RoBERTa: the
    regression head), freshly initialised (seed 0), so the checkpoint is a complete model."""
    from .models.config import D2vMultiConfig
    from .models.settings import model_settings
    from .modules.data2vec import Data2Vec

    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = Data2Vec(model_settings(D2vMultiConfig(**cfg))).state_dict()
    missing = [k for k in fresh if k not in state and k != "_ema"]
    if missing:
        logger.info("freshly initialised (not in the checkpoint): %s", ", ".join(missing))
    return {**state, **{k: fresh[k] for k in missing}}


def convert_training(training: Dict) -> Dict:
    """Official ``optimization`` / ``optimizer`` / ``lr_scheduler`` sections (plain dicts) -> the
    same training for d2v_plugin: fairseq's ``adam`` and the official scheduler, no ``composite``.

    The official v2 image and text recipes use ``composite`` with ``dynamic_groups`` and one
    ``default`` group, and the models mark 1-D parameters, biases and ``alibi_scale`` with
    ``optim_overrides = {"optimizer": {"weight_decay_scale": 0}}``. fairseq applies that scale
    only when the group's optimizer config has a key ``optimizer_config`` (composite.py), which
    no optimizer config has, so every parameter keeps the full weight decay: one ``default``
    group trains exactly like the plain optimizer (the trajectory fixtures record it)."""
    optim = dict(training["optimization"])
    opt, sched = dict(training["optimizer"]), training.get("lr_scheduler")
    if opt.get("_name") == "composite":
        groups = opt.get("groups") or {}
        if set(groups) != {"default"}:
            raise ValueError(f"composite optimizer with groups {sorted(groups)}: only a single 'default' group "
                             "(the official pretraining recipes) has a plain-optimizer equivalent")
        group = groups["default"]
        if group.get("lr_float") is not None:
            optim["lr"] = [group["lr_float"]]
        opt, sched = dict(group["optimizer"]), group.get("lr_scheduler")
    sched = dict(sched) if isinstance(sched, dict) else {"_name": sched}
    for section in (opt, sched):
        section.pop("lr", None)  # interpolated from optimization.lr
    return {"optimization": optim, "optimizer": opt, "lr_scheduler": sched}


OFFICIAL_MODELS = {"data2vec_multi": "data2vec2", "data2vec_audio": "data2vec1_audio", "data2vec_text": "data2vec1_text",
                   "roberta": "roberta", "mae": "mae"}


def model_name(cfg) -> str:
    """``cfg.model._name`` of a fairseq checkpoint config whose model section is a dict,
    an OmegaConf node or an argparse Namespace (fairseq's argparse-registered models such
    as RoBERTa); RoBERTa's size variants (``roberta_base``, ...) are ``roberta``."""
    model = (cfg or {}).get("model") if hasattr(cfg, "get") else None
    model = vars(model) if isinstance(model, argparse.Namespace) else (model or {})
    name = model.get("_name")
    return "roberta" if isinstance(name, str) and name.startswith("roberta") else name


_EMBED_KEYS = ("modality_encoders.TEXT.local_encoder.embed_tokens.weight", "encoder.sentence_encoder.embed_tokens.weight")


def official_parts(ckpt: Dict) -> Tuple[Dict, str, Dict, Dict]:
    """An official fairseq checkpoint (``cfg.model._name`` data2vec_multi / data2vec_audio /
    data2vec_text) or a golden fixture -> (model config, family, state dict, task config)."""
    from omegaconf import OmegaConf

    if ckpt.get("cfg") is not None:
        cfg = ckpt["cfg"]
        if OmegaConf.is_config(cfg):
            try:
                cfg = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # an interpolation into settings the checkpoint did not keep
                cfg = OmegaConf.to_container(cfg, resolve=False)
        else:
            cfg = dict(cfg)
        model = cfg.get("model")
        model_cfg = dict(vars(model) if isinstance(model, argparse.Namespace) else (model or {}))
        family = OFFICIAL_MODELS.get(model_name(cfg))
        if family is None:
            raise ValueError(f"model {model_cfg.get('_name')!r} is not an official data2vec model or RoBERTa "
                             f"({', '.join(OFFICIAL_MODELS)})")
        return model_cfg, family, ckpt["model"], dict(cfg.get("task") or {})
    if ckpt.get("args") is not None:
        raise ValueError("checkpoints with an argparse `args` config (fairseq < 0.10) are not supported; re-save with fairseq 0.12")
    if "family" in ckpt and "state_dict" in ckpt:  # the golden fixtures' layout
        return ckpt["config"], ckpt["family"], ckpt["state_dict"], {}
    raise ValueError("not a fairseq checkpoint: it has no `cfg` entry")


def convert_checkpoint(ckpt: Dict, dictionary: bytes = b"", spm_model: bytes = b"") -> Dict:
    """Official checkpoint dict -> a d2v_plugin pretraining checkpoint dict (model ``d2v_multi``,
    teacher kept as ``_ema`` when present) that fine-tuning and extraction read."""
    model_cfg, family, sd, task_cfg = official_parts(ckpt)
    vocab = next((sd[k].shape[0] for k in _EMBED_KEYS if k in sd), 0)
    cfg = convert_config(model_cfg, family, vocab)
    modality = cfg["modalities"]
    task = {"_name": f"d2v_{modality}_pretraining", "data": str(task_cfg.get("data", ""))}
    if modality == "audio":
        task.update(normalize=bool(task_cfg.get("normalize", False)), sample_rate=int(task_cfg.get("sample_rate", 16000)))
    if modality == "image":
        task["input_size"] = cfg["image_input_size"]
    as_bytes = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else None  # noqa: E731
    updates = (ckpt.get("optimizer_history") or [{}])[-1].get("num_updates", 0)
    state = convert_state_dict(sd, family)
    if family in ("roberta", "mae"):  # no regression head / conv decoder: freshly initialised
        state = _fresh_pretraining_weights(cfg, state)
    return {
        "cfg": {"model": {"_name": "d2v_multi", **cfg}, "task": task, "converted_from": family},
        "model": state,
        "optimizer_history": [{"criterion_name": "D2vCriterion", "optimizer_name": "converted", "lr_scheduler_state": {},
                               "num_updates": updates}],
        "task_state": {"dictionary": as_bytes(dictionary), "spm_model": as_bytes(spm_model)},
        "extra_state": {}, "last_optimizer_state": None, "args": None,
    }
