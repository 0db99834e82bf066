"""Unit tests of the pure-PyTorch core against hand-computed references."""
import math

import pytest
import torch
import torch.nn.functional as F

from d2v_plugin.models.d2v_multi import D2vMultiModel
from d2v_plugin.modules.ema import EMATeacher, ema_decay_at
from d2v_plugin.modules.feature_extractor import conv_output_lengths, parse_conv_spec, receptive_field
from d2v_plugin.modules.loss import CollapseError, CollapseMonitor, channel_std, regression_loss
from d2v_plugin.modules.masking import block_mask_1d, kept_positions, seeded_generator, span_mask_1d
from d2v_plugin.modules.positional import alibi_bias_1d, alibi_slopes
from d2v_plugin.modules.targets import build_targets
from d2v_plugin.modules.transformer import Attention, Block, attention_bias, explicit_attention

from .conftest import tiny_cfg


def batch(lengths=(4000, 3200)):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(len(lengths), max(lengths), generator=g)
    pad = torch.arange(max(lengths))[None] >= torch.tensor(lengths)[:, None]
    return src.masked_fill(pad, 0.0), pad


# -- EMA -------------------------------------------------------------------------------
def test_ema_step_is_convex_combination_and_copies_frozen():
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    student[1].weight.requires_grad_(False)
    teacher = EMATeacher({"0": student[0], "1": student[1]})
    old = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.step(student, 0.75)
    new = teacher.state_dict()
    for k, s in student.state_dict().items():
        expected = s if k == "1.weight" else 0.75 * old[k] + 0.25 * s
        assert torch.allclose(new[k], expected, atol=1e-6), k


def test_ema_decay_schedule():
    assert ema_decay_at(0, 0.9, 0.99, 10) == pytest.approx(0.9)
    assert ema_decay_at(5, 0.9, 0.99, 10) == pytest.approx(0.945)
    assert ema_decay_at(10, 0.9, 0.99, 10) == 0.99
    assert ema_decay_at(1000, 0.9, 0.99, 10) == 0.99


def test_teacher_fp32_no_grad_not_trainable():
    model = D2vMultiModel(tiny_cfg())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    src, pad = batch()
    out = model(src, pad)
    out["losses"]["regression"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    student = [(n, p) for n, p in model.named_parameters() if not n.startswith("teacher.")]
    missing = [n for n, p in student if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"
    model.half()
    assert {p.dtype for p in model.teacher.parameters()} == {torch.float32}
    assert model.blocks[0].mlp.fc1.weight.dtype == torch.float16
    model.teacher.step(model, 0.5)  # fp16 student, fp32 arithmetic
    assert {p.dtype for p in model.teacher.parameters()} == {torch.float32}


def student_inputs(modality: str):
    """A tiny model config and a batch (source, padding_mask) of each modality."""
    if modality == "audio":
        return {}, batch()
    if modality == "image":
        cfg = dict(modalities="image", image_input_size=16, image_patch_size=4, image_prenet_depth=1,
                   image_decoder_dim=16, image_decoder_layers=1, image_decoder_groups=4, image_mask_length=2)
        return cfg, (torch.randn(2, 3, 16, 16), None)
    cfg = dict(modalities="text", text_vocab_size=40, text_mask_index=39, text_max_positions=16, text_dropout=0.0,
               text_prenet_depth=1, text_decoder_dim=16, text_decoder_layers=1, text_decoder_groups=1)
    tokens = torch.randint(4, 39, (2, 12))
    tokens[:, 0], tokens[1, 9:] = 0, 1
    return cfg, (tokens, None)


@pytest.mark.parametrize("algorithm", ["v1", "v2"])
@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_gradients_reach_every_student_parameter_and_never_the_teacher(modality, algorithm):
    cfg, (src, pad) = student_inputs(modality)
    if algorithm == "v1":
        cfg.update(algorithm="v1", clone_batch=1, image_mask_type="beit", image_mask_length=2, text_mask_type="span",
                   text_mask_length=2, text_mask_prob=0.3, audio_mask_type="span", audio_mask_prob=0.65,
                   audio_mask_length=10, audio_use_alibi=False)
    torch.manual_seed(0)
    model = D2vMultiModel(tiny_cfg(**cfg))
    out = model(src, pad)
    sum(out["losses"].values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert trainable and not missing, f"no gradient for {missing}"
    assert all(p.grad is None for p in model.teacher.parameters())
    assert (model.modality_encoders[modality].decoder is None) == (algorithm == "v1")


def test_ema_step_updates_only_teacher_with_copy_prefix():
    model = D2vMultiModel(tiny_cfg(algorithm="v1", ema_copy_pos_conv=True))
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("teacher."):
                p.add_(1.0)
    model.ema_step(1)
    d = ema_decay_at(1, 0.9, 0.99, 10)
    student = dict(model.named_parameters())
    for k, v in model.teacher.state_dict().items():
        expected = student[k] if ".pos_conv." in k else d * before[k] + (1 - d) * student[k]
        assert torch.allclose(v, expected, atol=1e-6), k
    assert model.ema_steps == 1


# -- masks -----------------------------------------------------------------------------
def test_block_mask_exact_count_padding_and_seed():
    lengths = torch.tensor([100, 73, 40])
    m1 = block_mask_1d(lengths, 100, 0.5, 5, 0.05, seeded_generator(1, 2, 3))
    m2 = block_mask_1d(lengths, 100, 0.5, 5, 0.05, seeded_generator(1, 2, 3))
    m3 = block_mask_1d(lengths, 100, 0.5, 5, 0.05, seeded_generator(1, 2, 4))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    for row, n in zip(m1, lengths.tolist()):
        assert int(row.sum()) == int(n * 0.5)
        assert not row[n:].any()
    # blocks: most masked frames have a masked neighbour
    runs = (m1[:, 1:] & m1[:, :-1]).sum() / m1.sum()
    assert runs > 0.6


def test_span_mask_padding_and_seed():
    lengths = torch.tensor([200, 120])
    m = span_mask_1d(lengths, 200, 0.65, 10, generator=seeded_generator(7))
    assert torch.equal(m, span_mask_1d(lengths, 200, 0.65, 10, generator=seeded_generator(7)))
    assert not m[1, 120:].any()
    assert 0.3 < m[0].float().mean() < 0.7  # p=0.65 x 10 with overlaps masks about half


def test_kept_positions_time_order_and_filler():
    mask = torch.tensor([[True, False, False, True, False], [True, True, False, True, True]])
    ids, pad = kept_positions(mask)
    assert ids.tolist()[0] == [1, 2, 4]
    assert ids[1, 0] == 2 and pad.tolist() == [[False] * 3, [False, True, True]]


# -- targets and loss --------------------------------------------------------------------
def test_targets_instance_norm_topk_average_by_hand():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 6, 4, generator=g) * (i + 1) + i for i in range(3)]

    def inorm(x):  # per sample and channel over time
        return (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)

    expected = (inorm(layers[1]) + inorm(layers[2])) / 2
    assert torch.allclose(build_targets(layers, 2, "instance"), expected, atol=1e-5)
    ln = (F.layer_norm(layers[2], (4,)) + F.layer_norm(layers[1], (4,))) / 2
    assert torch.allclose(build_targets(layers, 2, "layer", "layer"), F.layer_norm(ln, (4,)), atol=1e-5)
    with pytest.raises(ValueError):
        build_targets(layers, 4)


def test_targets_padding_aware_ignores_padded_positions():
    x = torch.randn(1, 8, 3)
    pad = torch.tensor([[False] * 5 + [True] * 3])
    y_short = build_targets([x[:, :5]], 1, "instance")
    y_pad = build_targets([x], 1, "instance", padding_mask=pad)
    assert torch.allclose(y_pad[:, :5], y_short, atol=1e-5)


def test_regression_loss_values():
    p, t = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    assert torch.allclose(regression_loss(p, t, "l2"), torch.tensor([[1.0, 4.0]]) / math.sqrt(2))
    sl1 = regression_loss(p, t, "smooth_l1", beta=4.0, scale=1.0)  # |d| < beta: 0.5 d^2 / beta
    assert torch.allclose(sl1, torch.tensor([[0.125, 0.5]]))


def test_loss_counts_only_masked_positions():
    torch.manual_seed(0)
    model = D2vMultiModel(tiny_cfg()).eval()
    src, pad = batch()
    with torch.no_grad():
        feats, fpad = model.modality_encoders["audio"].local_features(src, pad)
        targets, _ = model.forward_teacher("audio", feats, fpad)
        mask = torch.zeros(4, targets.shape[1], dtype=torch.bool)
        mask[:, 10:30] = True
        pred, _ = model.forward_student("audio", feats, fpad, mask)
        assert pred.shape == (80, 32)
        out = model.forward_loss(pred, targets, mask)
        assert out["sample_size"] == 80
        y = targets.repeat_interleave(2, 0)[mask]
        assert torch.allclose(out["losses"]["regression"], ((pred - y) ** 2).sum() / math.sqrt(32), rtol=1e-5)
        targets2 = targets.clone()
        targets2[:, :10] += 100.0  # change targets at unmasked positions only
        assert torch.allclose(model.forward_loss(pred, targets2, mask)["losses"]["regression"], out["losses"]["regression"])


def test_channel_std_and_collapse_monitor():
    x = torch.randn(1000, 8) * 3
    assert channel_std(x) == pytest.approx(3.0, rel=0.1)
    assert channel_std(torch.ones(10, 8)) == pytest.approx(1e-3, rel=1e-3)
    mon = CollapseMonitor(0.1, 0.01, start_update=5, patience=2)
    mon.check(1, 0.0, 0.0)  # before start_update
    mon.check(5, 0.05, 1.0)
    with pytest.raises(CollapseError, match="target_var=0.05"):
        mon.check(6, 0.05, 1.0)


def test_collapsed_model_stops_training():
    model = D2vMultiModel(tiny_cfg(collapse_check_start_update=0, collapse_patience=1, min_target_var=10.0))
    src, pad = batch()
    with pytest.raises(CollapseError, match="representation collapse"):
        model(src, pad)
    # a really collapsed teacher (constant FFN outputs -> constant targets), default thresholds:
    model = D2vMultiModel(tiny_cfg(collapse_check_start_update=0, collapse_patience=2))
    with torch.no_grad():
        for blk in model.teacher.blocks:
            blk.mlp.fc2.weight.zero_()
            blk.mlp.fc2.bias.fill_(0.5)
    model(src, pad)  # one low update is tolerated (patience 2)
    with pytest.raises(CollapseError, match=r"target_var=0\.001 \(min 0\.1\), pred_var=[\d.]+ \(min 0\.01\) for 2 consecutive"):
        model(src, pad)


# -- blocks and encoders --------------------------------------------------------------
def test_pre_ln_block_keeps_both_residuals():
    torch.manual_seed(0)
    blk = Block(8, 2, layer_norm_first=True).eval()
    x = torch.randn(2, 5, 8)
    out, t = blk(x)
    a = x + blk.attn(blk.norm1(x), None)
    assert torch.allclose(t, blk.mlp(blk.norm2(a)), atol=1e-6)
    assert torch.allclose(out, a + t, atol=1e-6)


def test_post_ln_block_by_hand():
    torch.manual_seed(0)
    blk = Block(8, 2).eval()
    x = torch.randn(2, 5, 8)
    out, t = blk(x)
    h = blk.norm1(x + blk.attn(x, None))
    assert torch.allclose(t, blk.mlp(h), atol=1e-6) and torch.allclose(out, blk.norm2(h + t), atol=1e-6)


def attention_by_hand(q, k, v, allowed):
    """softmax over the allowed keys of q.k / sqrt(d), one query at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for b, h, t in torch.cartesian_prod(*(torch.arange(n) for n in q.shape[:3])).tolist():
        s = (k[b, h] @ q[b, h, t]) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~allowed[b], float("-inf"))
        out[b, h, t] = s.softmax(0) @ v[b, h]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_attention_is_attention_with_padding_and_alibi(dtype):
    """The bf16/fp16 CPU path (explicit_attention) and the fused kernel both compute attention by
    hand, with a padding mask and with an additive (ALiBi-like) bias; a bf16 Attention module
    on the CPU takes the explicit path and agrees with its fp32 self within bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    mask = attention_bias(pad, None, torch.float32)  # (B, 1, 1, K) bool
    want = attention_by_hand(q, k, v, ~pad)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    got = explicit_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, 0.0).double()
    assert (got - want).abs().max() < tol
    assert (F.scaled_dot_product_attention(q, k, v, attn_mask=mask).double() - want).abs().max() < 1e-5
    alibi = -torch.rand(2, 3, 6, 6, generator=g)
    bias = attention_bias(pad, alibi, torch.float32)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).double()
    assert (explicit_attention(q.to(dtype), k.to(dtype), v.to(dtype), bias.to(dtype), 0.0).double() - fused).abs().max() < tol
    attn = Attention(8, 2).eval()
    x = torch.randn(2, 6, 8, generator=g)
    ref = attn(x, mask)
    assert (attn.to(torch.bfloat16)(x.bfloat16(), mask).float() - ref).abs().max() < 5e-2


def test_alibi_matches_reference_components():
    comps = torch.load(__import__("pathlib").Path(__file__).parent / "golden" / "components.pt", weights_only=True)["items"]
    for key in ("alibi_1d_0", "alibi_1d_1"):
        item = comps[key]
        n, heads = item["max_positions"], item["heads"]
        ours = alibi_bias_1d(torch.arange(n)[None], torch.tensor(alibi_slopes(heads)))[0]
        assert torch.allclose(ours, item["bias"], atol=1e-6), key


def test_conv_spec_parsing():
    spec = parse_conv_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2")
    assert len(spec) == 7 and spec[0].kernel == 10 and spec[-1].stride == 2
    assert receptive_field(spec) == 400
    assert conv_output_lengths(torch.tensor([16000, 400, 399]), spec).tolist() == [49, 1, 0]
    with pytest.raises(ValueError, match="bad conv layer spec"):
        parse_conv_spec("[(512, 10, 5)] + __import__('os')")


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="num_heads"):
        D2vMultiModel(tiny_cfg(num_heads=5))
    with pytest.raises(ValueError, match="modalities"):
        D2vMultiModel(tiny_cfg(modalities="smell"))
    with pytest.raises(ValueError, match="mask_prob"):
        D2vMultiModel(tiny_cfg(audio_mask_prob=1.5))


# -- state dict ------------------------------------------------------------------------
def test_state_dict_has_ema_entry_and_round_trips():
    model = D2vMultiModel(tiny_cfg())
    model.ema_step(1)
    with torch.no_grad():
        model.teacher.blocks[0].mlp.fc1.weight.add_(1.0)
    sd = model.state_dict()
    assert "_ema" in sd and not any(k.startswith("teacher.") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd["_ema"].values())
    other = D2vMultiModel(tiny_cfg())
    other.load_state_dict(sd)
    for k, v in other.teacher.state_dict().items():
        assert torch.equal(v, sd["_ema"][k]), k
    del sd["_ema"]  # a checkpoint without its teacher loads, teacher = student copy
    other.load_state_dict(sd)
    assert torch.equal(other.teacher.blocks[0].mlp.fc1.weight, other.blocks[0].mlp.fc1.weight)


def test_extract_features_and_remove_pretraining_modules():
    model = D2vMultiModel(tiny_cfg()).eval()
    src, pad = batch()
    out = model.extract_features(src, pad)
    assert out["x"].shape[:2] == out["padding_mask"].shape and len(out["layer_results"]) == 2
    model.remove_pretraining_modules()
    assert model.teacher is None and "_ema" not in model.state_dict()
    assert torch.allclose(model.extract_features(src, pad)["x"], out["x"])


@pytest.mark.parametrize("algorithm", ["v1", "v2"])
def test_eval_skips_conv_work_on_padding_with_the_same_features(algorithm):
    """Where padded frames are zeroed before anything reads them (v1, padding_aware) and the
    extractor normalises frame by frame (layer_norm), eval computes each row's frames from its
    valid samples alone: the features of every layer equal the full padded computation's."""
    model = D2vMultiModel(tiny_cfg(algorithm=algorithm, audio_extractor_mode="layer_norm")).eval()
    enc = model.modality_encoders["audio"]
    assert enc.trim_padding
    src, pad = batch((4000, 3200, 1700))
    calls = []
    hook = enc.feature_extractor.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-1]))
    with torch.no_grad():
        trimmed, frame_pad = model.hidden_states(src, pad)
        enc.trim_padding = False
        full, _ = model.hidden_states(src, pad)
    hook.remove()
    assert calls == [4000, 3200, 1700, 4000]  # one row at a time, its valid samples only; then the padded batch
    for a, b in zip(trimmed, full):
        torch.testing.assert_close(a[~frame_pad], b[~frame_pad], atol=1e-5, rtol=0)
    model.train()  # training keeps the batched extractor (the golden fixtures hook its output)
    assert model.modality_encoders["audio"].local_features(src, pad)[0].shape[0] == 3


def test_random_text_mask_is_exact_and_spares_padding_and_ends():
    from d2v_plugin.modules.masking import MaskSettings

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([20, 12, 3])
    m = MaskSettings("random", 0.5, 1, keep_ends=True)(lengths, 20, g)
    assert m.sum(1).tolist() == [9, 5, 0]  # int((n - 2) * 0.5): <s> and </s> never masked
    for b, n in enumerate(lengths.tolist()):
        assert not m[b, n - 1:].any() and not m[b, 0]


def test_text_span_mask_spares_padding_and_ends():
    from d2v_plugin.modules.masking import MaskSettings

    lengths = torch.tensor([40, 9, 2])
    for seed in range(20):
        m = MaskSettings("span", 0.35, 4, keep_ends=True)(lengths, 40, torch.Generator().manual_seed(seed))
        for b, n in enumerate(lengths.tolist()):
            assert not m[b, 0] and not m[b, n - 1:].any()
        assert m[0].sum() >= 4 and m[1].sum() >= 4  # at least one whole span inside <s> ... </s>
        assert not m[2].any()


def test_text_positions_follow_fairseq_convention():
    from d2v_plugin.models.d2v_multi import D2vMultiModel

    kw = dict(modalities="text", text_vocab_size=10, text_max_positions=8, text_dropout=0.0, text_decoder_dim=16,
              text_decoder_layers=1, text_mask_type="random", text_mask_prob=0.5, text_mask_length=1, audio_decoder_groups=4)
    model = D2vMultiModel(tiny_cfg(**kw))
    enc = model.modality_encoders["text"]
    tokens = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])  # second row padded (pad = 1)
    feats, pad = enc.local_features(tokens)
    assert pad.tolist() == [[False] * 4, [False, False, False, True]]
    emb = enc.embed_tokens(tokens[1, 2]) + enc.embed_positions(torch.tensor(1 + 1 + 2))  # pad + 1 + index
    assert torch.allclose(feats[1, 2], enc.layernorm_embedding(emb))
    with pytest.raises(ValueError, match="exceed text_max_positions=8"):
        enc.local_features(torch.zeros(1, 9, dtype=torch.long))
    assert list(model.teacher.state_dict()) == [k for k in model.teacher.state_dict() if k.startswith("blocks.")]
    out = model(tokens)
    assert out["sample_size"] == 2 * 2 + 1 * 2  # int(4 * 0.5) + int(3 * 0.5) real tokens, per view (clone_batch 2)
    spare = D2vMultiModel(tiny_cfg(**kw, text_keep_ends=True))
    assert spare(tokens)["sample_size"] == 1 * 2 + 0 * 2  # int((4-2)*0.5) + int((3-2)*0.5): <s>, </s> spared


def test_channels_last_conv_equals_the_plain_convolution():
    from d2v_plugin.modules.positional import conv_channels_last

    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 37, 16), torch.randn(2, 5, 6, 16)  # (B, T, C), (B, h, w, C)
    for conv, x in ((torch.nn.Conv1d(16, 8, 5, stride=2, padding=2, groups=4), x1),
                    (torch.nn.Conv1d(16, 8, 4, padding=2, padding_mode="reflect"), x1),
                    (torch.nn.Conv1d(16, 8, 3, padding="same"), x1),
                    (torch.nn.Conv2d(16, 8, 3, padding=1, groups=2), x2)):
        y = conv_channels_last(conv, x)
        ref = conv(x.movedim(-1, 1)).movedim(1, -1)
        assert y.shape == ref.shape and y.is_contiguous()
        assert torch.allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["v1", "v2"])
def test_no_false_shared_parameter_reports(algorithm):
    """fairseq's trainer logs "detected shared parameter" for parameters that share storage;
    None entries (bias-free convs, the teacher's dropped mask_emb) used to count as shared."""
    from fairseq.trainer import _catalog_shared_params

    from d2v_plugin.models.d2v_multi import D2vMultiModel

    from .conftest import tiny_cfg

    assert _catalog_shared_params(D2vMultiModel(tiny_cfg(algorithm=algorithm))) == []
