"""Parity with the official fairseq data2vec code, on its own recorded outputs.

Every speech fixture (``family`` data2vec2 with an AUDIO encoder, or data2vec1_audio),
every image and text fixture of data2vec 2.0 and every data2vec1_text fixture in ``D2V_GOLDEN_DIR``
(default tests/golden/) is loaded: the official weights are
mapped onto d2v_multi, the forward is rerun with the stored mask, and every stage is
compared within 1e-5. The fixtures' README describes each tensor.
"""
import os
from pathlib import Path

import pytest
import torch

from d2v_plugin.models.config import D2vMultiConfig
from d2v_plugin.models.d2v_multi import D2vMultiModel
from d2v_plugin.modules.loss import regression_loss
from d2v_plugin.official import convert_config, convert_state_dict

GOLDEN_DIR = Path(os.environ.get("D2V_GOLDEN_DIR", Path(__file__).parent / "golden"))
TOL = 1e-5


def fixture_kind(path: Path) -> str:
    """audio (v1 or v2), image, text_v2 or text_v1, from the file's family and weights."""
    r = torch.load(path, weights_only=True)
    family = r.get("family")
    if family in ("data2vec1_audio", "data2vec1_text"):
        return {"data2vec1_audio": "audio", "data2vec1_text": "text_v1"}[family]
    for prefix, kind in (("AUDIO", "audio"), ("IMAGE", "image"), ("TEXT", "text_v2")):
        if family == "data2vec2" and any(k.startswith(f"modality_encoders.{prefix}.") for k in r["state_dict"]):
            return kind
    return "unknown"


MODEL_FILES = sorted(p for p in GOLDEN_DIR.glob("*.pt") if p.name != "components.pt" and not p.name.startswith(("traj_", "mae_")))
KINDS = {p: fixture_kind(p) for p in MODEL_FILES}
AUDIO_FIXTURES = [p for p in MODEL_FILES if KINDS[p] == "audio"]
IMAGE_FIXTURES = [p for p in MODEL_FILES if KINDS[p] == "image"]
TEXT_FIXTURES = [p for p in MODEL_FILES if KINDS[p] == "text_v2"]
TEXT_V1_FIXTURES = [p for p in MODEL_FILES if KINDS[p] == "text_v1"]


def test_fixtures_present():
    assert AUDIO_FIXTURES, f"no speech golden fixture found in {GOLDEN_DIR} (set D2V_GOLDEN_DIR)"
    assert IMAGE_FIXTURES, f"no image golden fixture found in {GOLDEN_DIR} (set D2V_GOLDEN_DIR)"
    assert TEXT_FIXTURES, f"no data2vec 2.0 text golden fixture found in {GOLDEN_DIR} (set D2V_GOLDEN_DIR)"
    assert TEXT_V1_FIXTURES, f"no data2vec 1.0 text golden fixture found in {GOLDEN_DIR} (set D2V_GOLDEN_DIR)"


def close(name, ours, ref, tol=TOL):
    ours, ref = ours.detach().float(), ref.float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item() if ref.numel() else 0.0
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"


def build(r):
    vocab = len(r["extra"].get("dictionary_symbols", []))
    model = D2vMultiModel(D2vMultiConfig(**convert_config(r["config"], r["family"], vocab)))
    model.load_state_dict(convert_state_dict(r["state_dict"], r["family"]))
    model.train()
    return model


def by_position(x, ids_keep):
    """Reorder (B, K, D) rows given in the reference's kept order into time order."""
    order = torch.argsort(ids_keep, dim=1)
    return torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))


@pytest.fixture(params=AUDIO_FIXTURES, ids=lambda p: p.name)
def fixture(request):
    return torch.load(request.param, weights_only=True)


@pytest.fixture(params=IMAGE_FIXTURES, ids=lambda p: p.name)
def image_fixture(request):
    return torch.load(request.param, weights_only=True)


def test_training_forward(fixture):
    r, out = fixture, fixture["outputs"]
    v1 = r["family"] == "data2vec1_audio"
    model = build(r)
    enc = model.modality_encoders["audio"]
    src = r["inputs"]["source"]
    pad = r["inputs"]["padding_mask"]
    mask = r["mask"]

    seen = {}
    enc.feature_extractor.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o))
    model.blocks[0].register_forward_pre_hook(lambda m, i: seen.setdefault("in", []).append(i[0]))
    model.teacher.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("teacher_in", i[0]))
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[0]))

    feats, frame_pad = enc.local_features(src, pad)
    close("local_encoder_out", seen["conv"], out["local_encoder_out"])
    close("local_features", feats, out["features"] if v1 else out["local_features"])
    ref_pad = out["frame_padding_mask"] if v1 else out["teacher_padding_mask"]
    assert torch.equal(frame_pad, ref_pad), "frame padding mask differs"

    targets, layers = model.forward_teacher("audio", feats, frame_pad)
    ref_layers = [t.transpose(0, 1) for t in out["teacher_layer_results_tbc"]] if v1 else out["teacher_layer_results"]
    if not v1:
        close("teacher_in", seen["teacher_in"], out["teacher_in"])
    for i, (ours, ref) in enumerate(zip(layers, ref_layers[-model.settings.average_top_k_layers:], strict=True)):
        close(f"teacher layer {i}", ours, ref)
    close("targets", targets, out["targets"])

    pred, _ = model.forward_student("audio", feats, frame_pad, mask)
    if v1:
        close("student_encoder_in", torch.where(mask.unsqueeze(-1), enc.mask_emb, feats), out["encoder_in"])
        close("student_encoder_out", seen["out"], out["student_encoder_out"])
    else:
        ids = r["mask_info"]["ids_keep"]
        close("student_encoder_in", seen["in"][0], by_position(out["student_encoder_in"], ids))
        close("student_encoder_out", seen["out"], by_position(out["student_encoder_out"], ids))
    close("pred_masked", pred, out["pred_masked"])

    result = model.forward_loss(pred, targets, mask)
    ref_res = out["result"]
    ref_loss = ref_res["losses"]["regression"] if v1 else ref_res["losses"]["AUDIO_regression"]
    y = targets.repeat_interleave(model.cfg.clone_batch, 0)[mask]
    elementwise = regression_loss(pred, y, model.cfg.loss, model.cfg.loss_beta, model.cfg.loss_scale)
    if not v1:
        close("loss (elementwise)", elementwise, ref_loss)
    close("loss", result["losses"]["regression"], ref_loss.sum(), tol=TOL * max(1.0, float(ref_loss.sum().abs())))
    assert result["sample_size"] == int(ref_res["sample_size"])
    close("target_var", result["target_var"], torch.as_tensor(ref_res["target_var"]))
    close("pred_var", result["pred_var"], torch.as_tensor(ref_res["pred_var"]))


def test_image_training_forward(image_fixture):
    r, out = image_fixture, image_fixture["outputs"]
    model = build(r)
    enc = model.modality_encoders["image"]
    E, M = enc.num_extra, model.cfg.clone_batch
    src, mask, ids = r["inputs"]["source"], r["mask"], r["mask_info"]["ids_keep"]
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, i: seen.setdefault("in", []).append(i[0]))
    model.teacher.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("teacher_in", i[0]))
    model.teacher.modality_encoders["image"].patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("t_local", o))
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[0]))

    feats, pad = enc.local_features(src)
    close("local_features", feats, out["local_features"])
    targets, layers = model.forward_teacher("image", feats, pad, src)
    close("teacher_local_encoder_out", seen["t_local"], out["teacher_local_encoder_out"])
    close("teacher_in", seen["teacher_in"], out["teacher_in"])
    for i, (ours, ref) in enumerate(zip(layers, out["teacher_layer_results"][-model.settings.average_top_k_layers:], strict=True)):
        close(f"teacher layer {i}", ours, ref[:, E:])
    close("targets", targets, out["targets"])

    pred, cls_pred = model.forward_student("image", feats, pad, mask)

    def in_time_order(x):  # (BM, E+K, D) in the reference's kept order -> extra tokens, then time order
        return torch.cat([x[:, :E], by_position(x[:, E:], ids)], dim=1)

    close("student_encoder_in", seen["in"][0], in_time_order(out["student_encoder_in"]))
    close("student_encoder_out", seen["out"], in_time_order(out["student_encoder_out"]))
    close("cls_pred", cls_pred, out["cls_pred"])
    close("pred_masked", pred, out["pred_masked"])

    result = model.forward_loss(pred, targets, mask, cls_pred, enc.cls_loss_weight)
    ref_res = out["result"]
    y = targets.repeat_interleave(M, 0)[mask]
    elementwise = regression_loss(pred, y, model.cfg.loss, model.cfg.loss_beta, model.cfg.loss_scale)
    close("loss (elementwise)", elementwise, ref_res["losses"]["IMAGE_regression"])
    cls_ref = ref_res["losses"]["cls"].sum()
    close("cls loss", result["losses"]["cls"], cls_ref, tol=TOL * max(1.0, float(cls_ref.abs())))
    assert result["sample_size"] == int(ref_res["sample_size"])
    assert result["masked_pct"] == pytest.approx(ref_res["masked_pct"])
    close("target_var", result["target_var"], torch.as_tensor(ref_res["target_var"]))
    close("pred_var", result["pred_var"], torch.as_tensor(ref_res["pred_var"]))


@pytest.mark.parametrize("path", IMAGE_FIXTURES, ids=lambda p: p.name)
def test_image_eval_features_and_ema(path):
    r = torch.load(path, weights_only=True)
    model = build(r).eval()
    with torch.no_grad():
        feats = model.extract_features(r["inputs"]["source"], modality="image")
    ref = r["outputs"]["features"]
    close("features.x", feats["x"], ref["x"])
    for i, (ours, theirs) in enumerate(zip(feats["layer_results"], ref["layer_results"], strict=True)):
        close(f"features layer {i}", ours, theirs)
    check_ema_step(r, model.train())


@pytest.mark.parametrize("path", TEXT_FIXTURES, ids=lambda p: p.name)
def test_text_v2(path):
    """Training forward (teacher = EMA blocks on the student's embeddings), eval features, EMA step."""
    r = torch.load(path, weights_only=True)
    out, src, pad, mask = r["outputs"], r["inputs"]["source"], r["inputs"]["padding_mask"], r["mask"]
    model = build(r)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, i: seen.setdefault("in", []).append(i[0]))
    model.teacher.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("teacher_in", i[0]))
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[0]))
    feats, token_pad = model.modality_encoders["text"].local_features(src, pad)
    close("local_features", feats, out["local_features"])
    targets, layers = model.forward_teacher("text", feats, token_pad, src)
    close("teacher_in", seen["teacher_in"], out["teacher_in"])
    for i, (ours, ref) in enumerate(zip(layers, out["teacher_layer_results"][-model.settings.average_top_k_layers:], strict=True)):
        close(f"teacher layer {i}", ours, ref)
    close("targets", targets, out["targets"])
    pred, _ = model.forward_student("text", feats, token_pad, mask)
    ids = r["mask_info"]["ids_keep"]
    close("student_encoder_in", seen["in"][0], by_position(out["student_encoder_in"], ids))
    close("student_encoder_out", seen["out"], by_position(out["student_encoder_out"], ids))
    close("pred_masked", pred, out["pred_masked"])
    result = model.forward_loss(pred, targets, mask)
    ref_loss = out["result"]["losses"]["TEXT_regression"]
    close("loss", result["losses"]["regression"], ref_loss.sum(), tol=TOL * max(1.0, float(ref_loss.sum().abs())))
    assert result["sample_size"] == int(out["result"]["sample_size"])
    close("target_var", result["target_var"], torch.as_tensor(out["result"]["target_var"]))
    close("pred_var", result["pred_var"], torch.as_tensor(out["result"]["pred_var"]))
    with torch.no_grad():
        feats = model.eval().extract_features(src, pad)
    close("features.x", feats["x"], out["features"]["x"])
    for i, (ours, theirs) in enumerate(zip(feats["layer_results"], out["features"]["layer_results"], strict=True)):
        close(f"features layer {i}", ours, theirs)
    check_ema_step(r, model.train())


@pytest.mark.parametrize("path", TEXT_V1_FIXTURES, ids=lambda p: p.name)
def test_text_v1(path):
    """BERT-style student input, teacher (EMA layers, copied embeddings) on the clean
    sentence, 2-layer head, Smooth-L1 loss, eval features, EMA step."""
    r = torch.load(path, weights_only=True)
    out, clean, corrupted, mask = r["outputs"], r["inputs"]["target_tokens"], r["inputs"]["src_tokens"], r["mask"]
    model = build(r)
    enc = model.modality_encoders["text"]
    assert enc.mask_index == r["extra"]["mask_index"]
    seen = {}
    for name, blocks in (("student", model.blocks), ("teacher", model.teacher.blocks)):
        for blk in blocks:
            blk.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(o[0]))
    model.teacher.modality_encoders["text"].embed_tokens.register_forward_hook(
        lambda m, i, o: seen.__setitem__("teacher_tokens", i[0]))
    # the span variant of the fixture: every masked position becomes <mask>
    assert torch.equal(enc.corrupt(clean, mask), corrupted)
    feats, pad = enc.local_features(corrupted)
    # embedding_out is fairseq's forward_embedding, before the encoder zeroes padded positions
    close("embedding_out", feats, out["embedding_out"].masked_fill(pad.unsqueeze(-1), 0.0))
    targets, layers = model.forward_teacher("text", *enc.local_features(clean), clean)
    assert torch.equal(seen["teacher_tokens"], clean), "the v1 teacher must read the clean sentence"
    for i, (ours, ref) in enumerate(zip(layers, out["teacher_layer_results_tbc"][-model.settings.average_top_k_layers:], strict=True)):
        close(f"teacher layer {i}", ours, ref.transpose(0, 1))
    close("targets", targets, out["targets"])
    close("targets_masked", targets[mask], out["targets_masked"])
    pred, _ = model.forward_student("text", feats, pad, mask)
    for i, (ours, ref) in enumerate(zip(seen["student"], out["student_layer_out_tbc"], strict=True)):
        close(f"student layer {i}", ours, ref.transpose(0, 1))
    close("pred_masked", pred, out["pred_masked"])
    elementwise = regression_loss(pred, targets[mask], model.cfg.loss, model.cfg.loss_beta, model.cfg.loss_scale)
    close("loss (elementwise)", elementwise, out["loss_elementwise"])
    result = model(clean, mask=mask)  # the whole training forward, corruption included
    ref_loss = out["result"]["losses"]["main"]
    close("loss", result["losses"]["regression"], ref_loss, tol=TOL * max(1.0, float(ref_loss.abs())))
    assert result["sample_size"] == int(out["result"]["sample_size"])
    with torch.no_grad():
        seen.clear()
        feats = model.eval().extract_features(clean)
    close("features.x", feats["x"], out["features_eval"]["x"])
    inner = out["features_eval"]["inner_states_tbc"]
    close("features embedding", enc.local_features(clean)[0], inner[0].transpose(0, 1))
    for i, (ours, ref) in enumerate(zip(seen["student"], inner[1:], strict=True)):
        close(f"features layer {i}", ours, ref.transpose(0, 1))
    check_ema_step(r, model.train())


def test_eval_features(fixture):
    r = fixture
    v1 = r["family"] == "data2vec1_audio"
    ref = r["outputs"]["features_eval" if v1 else "features"]
    model = build(r).eval()
    with torch.no_grad():
        feats = model.extract_features(r["inputs"]["source"], r["inputs"]["padding_mask"])
    close("features.x", feats["x"], ref["x"])
    ref_layers = [t.transpose(0, 1) for t in ref["layer_results_tbc"]] if v1 else ref["layer_results"]
    for i, (ours, theirs) in enumerate(zip(feats["layer_results"], ref_layers, strict=True)):
        close(f"features layer {i}", ours, theirs)


def test_ema_step(fixture):
    """One EMA step from the recorded teacher reproduces the saved ``_ema``."""
    check_ema_step(fixture, build(fixture))


def check_ema_step(r, model):
    ema_key = "encoder._ema" if r["family"] == "data2vec1_text" else "_ema"
    before = convert_state_dict({**r["state_dict"], ema_key: r["ema_test"]["ema_before"]}, r["family"])["_ema"]
    after = convert_state_dict(r["state_dict"], r["family"])["_ema"]
    model.teacher.load_state_dict(before)
    model.teacher.step(model, r["ema_test"]["decay_used"])
    state = model.teacher.state_dict()
    assert set(state) == set(after)
    for k, v in after.items():
        close(f"_ema[{k}]", state[k], v, tol=0.0)
