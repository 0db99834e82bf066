"""Export to Hugging Face ``transformers`` (``python -m d2v_plugin.export CKPT --to hf``):
pretraining checkpoints to ``Data2VecAudioModel`` / ``Data2VecTextModel``, fine-tuned ones to
``Data2VecAudioForCTC``, ``Data2VecAudioForSequenceClassification`` and
``Data2VecTextForSequenceClassification``.

transformers' ``Data2VecText*`` (RoBERTa layout) and ``Data2VecAudio*`` (wav2vec 2.0 layout
with a multi-layer positional convolution) compute exactly what the plugin computes when the
model is post-LN with LayerNorm eps 1e-5 and no context-stage blocks, and for speech has a
layer-normed conv extractor and no ALiBi: data2vec 1.0 text and speech, data2vec 2.0 text.
Everything else is refused with the reason (``hf_blocker``): data2vec 2.0 speech adds ALiBi
and prenet blocks, and no transformers class computes ``Data2VecVision``'s layer scale and
relative positions from the plugin's image blocks (nor data2vec 2.0's image encoder).

Speech models trained with ``padding_aware=true`` (the plugin's default) zero padded frames
between the positional convolution's layers too, so a padded row gives what it gives alone;
transformers (like the reference) zeroes them only before it: per utterance both agree, in
padded batches the rows shorter than the batch differ near their end (the export says so).

Weight mapping: the fused ``qkv`` projection is split into query, key and value; the rest
is renamed. For text, the folder gets a fast tokenizer (``AutoTokenizer``) that reproduces
sentencepiece + fairseq dictionary ids: transformers' own sentencepiece converter builds
the BPE, whose pieces are then numbered as in ``dict.txt``. Pieces the dictionary does not
hold (fairseq maps them to ``<unk>``) get ids after the dictionary, and the exported
embedding table repeats the ``<unk>`` row for them, so the model sees the same vectors.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from .export import ExportError, _text_files


def hf_blocker(model_cfg: Dict) -> Optional[str]:
    """Why no transformers class computes this model exactly, or None."""
    from .modules.data2vec import parse_modalities

    mods = parse_modalities(model_cfg.get("modalities", "audio"))
    if len(mods) != 1:
        return f"a multimodal model ({', '.join(mods)}): transformers has one class per modality"
    m = mods[0]
    if m == "image":
        return ("images: transformers' Data2VecVision is BEiT (layer scale, relative position bias, pre-LN), which the "
                "plugin's image encoders (data2vec 2.0: fixed sin-cos positions, post-LN, prenet) do not compute")
    if model_cfg.get("layer_norm_first"):
        return "pre-LN blocks (layer_norm_first=true): Data2VecAudio/Data2VecText are post-LN"
    if float(model_cfg.get("norm_eps", 1e-5)) != 1e-5:
        return f"norm_eps={model_cfg['norm_eps']}: transformers uses one eps for every LayerNorm here, the plugin 1e-5 in some"
    if int(model_cfg.get(f"{m}_prenet_depth", 0)):
        return f"{m}_prenet_depth={model_cfg[f'{m}_prenet_depth']}: context-stage blocks have no transformers counterpart"
    if m == "audio":
        if model_cfg.get("audio_use_alibi", False):
            return ("ALiBi attention bias (data2vec 2.0 speech): Data2VecAudio has only the convolutional positions; "
                    "use --to safetensors and d2v_plugin.load")
        if model_cfg.get("audio_extractor_mode", "layer_norm") != "layer_norm":
            return "a group-norm conv extractor: Data2VecAudio's feature extractor is layer-normed"
    return None


def _split_qkv(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = w.shape[0] // 3
    return w[:D], w[D : 2 * D], w[2 * D :]


def _blocks(state: Dict[str, torch.Tensor], depth: int, names: Dict[str, str], prefix: str) -> Dict[str, torch.Tensor]:
    """The shared blocks in transformers' names; ``names`` maps q, k, v, o, ln1, fc1, fc2, ln2."""
    out = {}
    for i in range(depth):
        b, p = f"blocks.{i}.", prefix.format(i=i)
        for kind in ("weight", "bias"):
            q, k, v = _split_qkv(state[b + f"attn.qkv.{kind}"])
            out.update({p + names["q"] + kind: q, p + names["k"] + kind: k, p + names["v"] + kind: v})
            for ours, theirs in (("attn.proj", "o"), ("norm1", "ln1"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("norm2", "ln2")):
                out[p + names[theirs] + kind] = state[f"{b}{ours}.{kind}"]
    return out


def audio_state(state: Dict[str, torch.Tensor], model_cfg: Dict, n_conv: int, n_pos: int) -> Dict[str, torch.Tensor]:
    e = "modality_encoders.audio."
    out = {"masked_spec_embed": state[e + "mask_emb"]} if e + "mask_emb" in state else {}
    for i in range(n_conv):
        out[f"feature_extractor.conv_layers.{i}.conv.weight"] = state[f"{e}feature_extractor.layers.{i}.conv.weight"]
        for kind in ("weight", "bias"):
            out[f"feature_extractor.conv_layers.{i}.layer_norm.{kind}"] = state[f"{e}feature_extractor.layers.{i}.norm.{kind}"]
    for kind in ("weight", "bias"):
        out[f"feature_projection.layer_norm.{kind}"] = state[f"{e}project.norm.{kind}"]
        out[f"feature_projection.projection.{kind}"] = state[f"{e}project.linear.{kind}"]
        out[f"encoder.layer_norm.{kind}"] = state[f"{e}context.norm.{kind}"]
        for i in range(n_pos):
            out[f"encoder.pos_conv_embed.layers.{i}.conv.{kind}"] = state[f"{e}pos_conv.layers.{i}.{kind}"]
    names = {"q": "attention.q_proj.", "k": "attention.k_proj.", "v": "attention.v_proj.", "o": "attention.out_proj.",
             "ln1": "layer_norm.", "fc1": "feed_forward.intermediate_dense.", "fc2": "feed_forward.output_dense.",
             "ln2": "final_layer_norm."}
    out.update(_blocks(state, int(model_cfg["depth"]), names, "encoder.layers.{i}."))
    return out


def text_state(state: Dict[str, torch.Tensor], model_cfg: Dict, extra_ids: int, unk: int) -> Dict[str, torch.Tensor]:
    e = "modality_encoders.text."
    words = state[e + "embed_tokens.weight"]
    D = words.shape[1]
    out = {"embeddings.word_embeddings.weight": torch.cat([words, words[unk : unk + 1].expand(extra_ids, D)]),
           "embeddings.position_embeddings.weight": state[e + "embed_positions.weight"],
           "embeddings.token_type_embeddings.weight": torch.zeros(1, D),
           # no pooler was trained: an identity map, so pooler_output = tanh(the <s> state), not random weights
           "pooler.dense.weight": torch.eye(D), "pooler.dense.bias": torch.zeros(D)}
    for kind in ("weight", "bias"):
        out[f"embeddings.LayerNorm.{kind}"] = state[f"{e}layernorm_embedding.{kind}"]
    names = {"q": "attention.self.query.", "k": "attention.self.key.", "v": "attention.self.value.",
             "o": "attention.output.dense.", "ln1": "attention.output.LayerNorm.", "fc1": "intermediate.dense.",
             "fc2": "output.dense.", "ln2": "output.LayerNorm."}
    out.update(_blocks(state, int(model_cfg["depth"]), names, "encoder.layer.{i}."))
    return out


def fast_tokenizer(spm_model: bytes, dictionary) -> Tuple["object", int]:
    """sentencepiece model + fairseq dictionary (with ``<mask>``) -> a ``tokenizers.Tokenizer``
    giving the plugin's ids (``<s> ... </s>``), and how many ids it uses after the dictionary."""
    from tokenizers import Tokenizer, processors
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(spm_model)
    if proto.trainer_spec.model_type != 2:  # BPE, what prep.text trains
        raise ExportError("only sentencepiece BPE models (prep.text's) are converted to a transformers tokenizer")
    bpe = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)})
    spec = json.loads(bpe.to_str())
    model = spec["model"]
    extra: List[str] = []

    def number(piece: str) -> int:
        if piece in dictionary.indices:
            return dictionary.indices[piece]
        extra.append(piece)
        return len(dictionary) + len(extra) - 1

    model["vocab"] = {p: number(p) for p in model["vocab"]}
    for s in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"):  # the dictionary's own ids (the BPE has none but <unk>)
        model["vocab"][s] = dictionary.indices[s]
    # symbols of the dictionary that are no BPE piece and consist of characters sentencepiece does
    # not know: it emits such a run as it is (one symbol per run). Spelled with merges that only
    # join unknown characters, so no segmentation of known text changes (symbols of known
    # characters that are no piece, e.g. fairseq's madeupword padding, are never emitted)
    known = set(model["vocab"])
    for sym in dictionary.symbols[4:]:
        if sym in known or sym == "<mask>" or any(ch in known for ch in sym):
            continue
        for k in range(1, len(sym) + 1):
            if sym[:k] not in model["vocab"]:
                if k > 1:
                    model["merges"].append([sym[: k - 1], sym[k - 1]])
                model["vocab"][sym[:k]] = number(sym[:k])
        for ch in sym:
            if ch not in model["vocab"]:
                model["vocab"][ch] = number(ch)
    tok = Tokenizer.from_str(json.dumps(spec))
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.add_special_tokens(specials)
    ids = {s: dictionary.indices[s] for s in specials}
    if {s: tok.token_to_id(s) for s in specials} != ids:
        raise ExportError(f"the tokenizer's special ids {[tok.token_to_id(s) for s in specials]} are not the dictionary's {ids}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    return tok, len(extra)


def _tokenizer(files: Dict[str, bytes], rows: int, path: str):
    """dict.txt + spm.model bytes -> (the dictionary with <mask>, the fast tokenizer, its ids after the dictionary)."""
    import io

    from .vocab import Vocabulary

    vocab = Vocabulary.load(io.StringIO(files["dict.txt"].decode("utf-8")), "dict.txt")
    vocab.add_symbol("<mask>")
    if len(vocab) != rows:
        raise ExportError(f"{path}: the dictionary has {len(vocab)} symbols with <mask>, the model {rows} embeddings")
    tok, extra = fast_tokenizer(files["spm.model"], vocab)
    return vocab, tok, extra


def _save(out: str, cfg, tensors: Dict[str, torch.Tensor], arch: str, tok=None, max_len: int = 0) -> None:
    """The transformers folder: config.json, model.safetensors (and the tokenizer of a text model)."""
    from safetensors.torch import save_file

    if tok is not None:
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                mask_token="<mask>", model_max_length=max_len).save_pretrained(out)
    cfg.architectures = [arch]
    cfg.save_pretrained(out)
    save_file({k: v.detach().float().contiguous().clone() for k, v in tensors.items()},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def _save_feature_extractor(out: str, task: Dict) -> None:
    """Wav2Vec2FeatureExtractor with the pretraining task's sample rate and normalisation."""
    from transformers import Wav2Vec2FeatureExtractor

    from .checkpoints import audio_normalize

    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=int(task.get("sample_rate", 16000)), padding_value=0.0,
                             do_normalize=audio_normalize(task), return_attention_mask=True).save_pretrained(out)


def _set_labels(cfg, labels: List[str]) -> None:
    cfg.id2label, cfg.label2id = dict(enumerate(labels)), {lab: i for i, lab in enumerate(labels)}


def hf_model(c: Dict, state: Dict[str, torch.Tensor], extra_ids: int = 0,
             specials: Tuple[int, int, int, int] = (0, 1, 2, 3)):
    """A plugin model config + encoder state -> (transformers config, its state dict, class name).
    ``extra_ids``: tokenizer ids after the dictionary (text); ``specials``: bos, pad, eos, unk ids."""
    from transformers import Data2VecAudioConfig, Data2VecTextConfig

    from .modules.feature_extractor import parse_conv_spec

    why = hf_blocker(c)
    if why:
        raise ExportError(f"no transformers class computes this model exactly: {why}")
    D, L, H = int(c["embed_dim"]), int(c["depth"]), int(c["num_heads"])
    common = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=int(D * float(c["mlp_ratio"])),
                  hidden_act="gelu", layer_norm_eps=1e-5)
    if "audio" in str(c.get("modalities", "audio")):
        spec = parse_conv_spec(c["audio_conv_feature_layers"])
        depth, width = int(c["audio_conv_pos_depth"]), int(c["audio_conv_pos_width"])
        cfg = Data2VecAudioConfig(conv_dim=[s.dim for s in spec], conv_kernel=[s.kernel for s in spec],
                                  conv_stride=[s.stride for s in spec], conv_bias=False,
                                  num_conv_pos_embeddings=depth, conv_pos_kernel_size=max(3, width // depth),
                                  num_conv_pos_embedding_groups=int(c["audio_conv_pos_groups"]),
                                  hidden_dropout=float(c.get("encoder_dropout", 0.0)),
                                  attention_dropout=float(c.get("attention_dropout", 0.0)),
                                  activation_dropout=float(c.get("activation_dropout", 0.0)),
                                  layerdrop=float(c.get("layerdrop", 0.0)),
                                  mask_time_prob=float(c.get("audio_mask_prob", 0.65)),
                                  mask_time_length=int(c.get("audio_mask_length", 10)), **common)
        return cfg, audio_state(state, c, len(spec), depth), "Data2VecAudioModel"
    bos, pad, eos, unk = specials
    vocab = state["modality_encoders.text.embed_tokens.weight"].shape[0]
    cfg = Data2VecTextConfig(vocab_size=vocab + extra_ids, max_position_embeddings=int(c["text_max_positions"]) + pad + 1,
                             type_vocab_size=1, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                             hidden_dropout_prob=float(c.get("encoder_dropout", 0.0)),
                             attention_probs_dropout_prob=float(c.get("attention_dropout", 0.0)), **common)
    return cfg, text_state(state, c, extra_ids, unk), "Data2VecTextModel"


def write_hf(ckpt_path: str, out: str, weights: str = "student") -> str:
    """CKPT -> a transformers folder; returns the class name written."""
    from .checkpoints import CheckpointError, PretrainedCheckpointError, finetuned_parts, load_checkpoint, read_pretrained
    from .extract import ExtractError, build_model

    try:
        ckpt = load_checkpoint(ckpt_path, "a d2v_plugin checkpoint")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    finetuned = finetuned_parts(ckpt)
    if finetuned is not None:
        if weights != "student":
            raise ExportError(f"{ckpt_path}: a fine-tuned checkpoint has no EMA teacher; export it without --weights")
        try:
            return write_hf_finetuned(ckpt_path, finetuned, out)
        except CheckpointError as e:  # the fine-tuning data folder that names the outputs is gone
            raise ExportError(str(e)) from None
    try:
        pre = read_pretrained(ckpt_path, None, ckpt)
    except PretrainedCheckpointError as e:
        raise ExportError(str(e)) from None
    c = pre["model"]
    why = hf_blocker(c)
    if why:
        raise ExportError(f"{ckpt_path}: no transformers class computes this model exactly: {why}")
    try:
        state = build_model(c, pre["state"], weights, ckpt_path).state_dict()
    except ExtractError as e:
        raise ExportError(str(e)) from None
    os.makedirs(out, exist_ok=True)
    tok = None
    if "text" not in str(c.get("modalities", "audio")):
        cfg, tensors, arch = hf_model(c, state)
        _save_feature_extractor(out, pre["task"])
    else:
        files = _text_files(pre, ckpt_path)
        vocab, tok, extra = _tokenizer(files, state["modality_encoders.text.embed_tokens.weight"].shape[0], ckpt_path)
        cfg, tensors, arch = hf_model(c, state, extra_ids=extra, specials=(vocab.bos(), vocab.pad(), vocab.eos(), vocab.unk()))
    _save(out, cfg, tensors, arch, tok, int(c.get("text_max_positions", 0)))
    if arch == "Data2VecAudioModel" and c.get("padding_aware", True):
        return (f"{arch} (the model has padding_aware=true: transformers gives its features per utterance; in padded "
                "batches it zeroes padded frames only before the positional conv, not between its layers, so rows "
                "shorter than the batch differ near their end)")
    return arch


FINETUNED = {"d2v_ctc": "Data2VecAudioForCTC", "d2v_audio_classifier": "Data2VecAudioForSequenceClassification",
             "d2v_text_classifier": "Data2VecTextForSequenceClassification", "d2v_image_classifier": None}


def write_hf_finetuned(path: str, ft: Dict, out: str) -> str:
    """A fine-tuned checkpoint -> transformers' ``...ForCTC`` / ``...ForSequenceClassification``."""
    from transformers import Wav2Vec2CTCTokenizer

    from .checkpoints import finetuned_outputs, finetuned_text_files
    from .extract import build_model
    from .modules.heads import HEADS

    arch = FINETUNED[ft["name"]]
    c = ft["pretrained"]
    why = hf_blocker(c) if arch else ("images: no transformers class computes the plugin's image encoder (see "
                                      "`--to hf` of its pretraining checkpoint)")
    if why:
        raise ExportError(f"{path}: no transformers class computes this model exactly: {why}")
    state = build_model(c, ft["encoder"], "student", path, stripped=True, modality=HEADS[ft["name"]].MODALITY).state_dict()
    head = ft["head"]
    if ft["name"] == "d2v_ctc":
        letters = finetuned_outputs(ft, path)
        if len(letters) != head["proj.weight"].shape[0]:
            raise ExportError(f"{path}: dict has {len(letters)} symbols, the CTC projection {head['proj.weight'].shape[0]}")
        cfg, tensors, _ = hf_model(c, state)
        cfg.vocab_size, cfg.pad_token_id = len(letters), 0  # CTC blank = <s> (index 0), transformers' pad
        cfg.final_dropout = float(ft["model"].get("final_dropout", 0.0))
        tensors = {"data2vec_audio." + k: v for k, v in tensors.items()}
        tensors.update({"lm_head.weight": head["proj.weight"], "lm_head.bias": head["proj.bias"]})
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({sym: i for i, sym in enumerate(letters)}, f, ensure_ascii=False)
        Wav2Vec2CTCTokenizer(os.path.join(out, "vocab.json"), bos_token="<bos_unused>", eos_token="<eos_unused>",
                             unk_token="<unk>", pad_token="<s>", word_delimiter_token="|").save_pretrained(out)
    if ft["name"] == "d2v_audio_classifier":
        labels = finetuned_outputs(ft, path)
        if len(labels) != head["classifier.weight"].shape[0]:
            raise ExportError(f"{path}: labels.txt has {len(labels)} classes, the head {head['classifier.weight'].shape[0]}")
        cfg, tensors, _ = hf_model(c, state)
        cfg.num_labels, cfg.classifier_proj_size = len(labels), head["projector.weight"].shape[0]
        _set_labels(cfg, labels)
        cfg.use_weighted_layer_sum = "layer_weights" in head
        tensors = {"data2vec_audio." + k: v for k, v in tensors.items()}
        tensors.update({k: v for k, v in head.items() if k.split(".")[0] in ("projector", "classifier", "layer_weights")})
    if ft["name"] in ("d2v_ctc", "d2v_audio_classifier"):
        os.makedirs(out, exist_ok=True)
        _save_feature_extractor(out, ft["pretrained_task"])
    if ft["name"] == "d2v_text_classifier":
        if ft["model"].get("pooling", "first") != "first":
            raise ExportError(f"{path}: pooling={ft['model']['pooling']!r}; Data2VecTextForSequenceClassification reads "
                              "the <s> token (pooling=first)")
        labels = finetuned_outputs(ft, path)
        outputs = head["head.3.weight"].shape[0]
        if outputs != max(1, len(labels)):
            raise ExportError(f"{path}: labels.txt has {len(labels)} labels, the head {outputs} outputs")
        files = finetuned_text_files(ft, path)
        vocab, tok, extra = _tokenizer(files, state["modality_encoders.text.embed_tokens.weight"].shape[0], path)
        cfg, tensors, _ = hf_model(c, state, extra_ids=extra, specials=(vocab.bos(), vocab.pad(), vocab.eos(), vocab.unk()))
        cfg.num_labels = outputs
        if labels:
            _set_labels(cfg, labels)
        else:
            cfg.problem_type = "regression"
        cfg.classifier_dropout = float(ft["model"].get("pooler_dropout", 0.0))
        tensors = {"data2vec_text." + k: v for k, v in tensors.items() if not k.startswith("pooler.")}
        for ours, theirs in (("head.0", "classifier.dense"), ("head.3", "classifier.out_proj")):
            for kind in ("weight", "bias"):
                tensors[f"{theirs}.{kind}"] = head[f"{ours}.{kind}"]
        os.makedirs(out, exist_ok=True)
        _save(out, cfg, tensors, arch, tok, int(c["text_max_positions"]))
        return arch
    _save(out, cfg, tensors, arch)
    return arch
