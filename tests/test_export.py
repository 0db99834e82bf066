"""Models that leave fairseq: python -m d2v_plugin.export (safetensors, transformers), loading
and extraction with fairseq blocked, EMA-teacher weights, and the fairseq-free dictionary."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import d2v_plugin
from d2v_plugin.export import ExportError
from d2v_plugin.extract import ExtractError
from d2v_plugin.models.config import D2vMultiConfig
from d2v_plugin.models.settings import model_settings
from d2v_plugin.modules.data2vec import EMA_KEY, Data2Vec
from d2v_plugin.vocab import Vocabulary

from .conftest import REPO, fairseq_checkpoint

pytest.importorskip("transformers")
TOL = 1e-4
AUDIO = dict(audio_conv_feature_layers="[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2", audio_conv_pos_width=8,
             audio_conv_pos_depth=2, audio_conv_pos_groups=4, audio_decoder_dim=16, audio_decoder_layers=1,
             audio_decoder_groups=4)
V1_AUDIO = dict(algorithm="v1", clone_batch=1, audio_mask_type="span", audio_use_alibi=False)
SMALL = dict(depth=2, embed_dim=32, num_heads=4, average_top_k_layers=2)


def make_checkpoint(path, task, perturb_teacher=False, **fields):
    """A pretraining checkpoint as fairseq writes it, of a tiny model whose weights (norms and
    biases included) are random, not their initial values."""
    cfg = D2vMultiConfig(**SMALL, **fields)
    torch.manual_seed(0)
    model = Data2Vec(model_settings(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    if perturb_teacher:  # a teacher that differs from the student, as after training
        state[EMA_KEY] = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state[EMA_KEY].items()}
    model_cfg = {k: getattr(v, "value", v) for k, v in dataclasses.asdict(cfg).items()}
    model_cfg["_name"] = "d2v_multi"
    fairseq_checkpoint(path, {"model": model_cfg, "task": task}, state)
    return path


@pytest.fixture(scope="module")
def ckpts(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    text_data = corpora["text"]
    vocab = len(Vocabulary.load(str(text_data / "dict.txt"))) + 1  # + <mask>
    text = dict(modalities="text", text_vocab_size=vocab, text_mask_index=vocab - 1, text_decoder_dim=16)
    speech = {"_name": "d2v_audio_pretraining", "normalize": True, "sample_rate": 16000}
    out = {
        "audio_v1": make_checkpoint(root / "audio_v1.pt", speech, perturb_teacher=True, modalities="audio", **AUDIO, **V1_AUDIO),
        "audio_v2": make_checkpoint(root / "audio_v2.pt", speech, modalities="audio", **AUDIO),
        "text_v1": make_checkpoint(root / "text_v1.pt", {"_name": "d2v_text_pretraining", "data": str(text_data)},
                                   algorithm="v1", clone_batch=1, **text),
        "text_v2": make_checkpoint(root / "text_v2.pt", {"_name": "d2v_text_pretraining", "data": str(text_data)}, **text),
        "image_v2": make_checkpoint(root / "image_v2.pt", {"_name": "d2v_image_pretraining"}, modalities="image",
                                    image_input_size=32, image_patch_size=8, image_decoder_dim=16),
    }
    rng = np.random.RandomState(0)
    out["wavs"] = []
    for i, n in enumerate((16000, 23456)):
        sf.write(root / f"w{i}.wav", (0.1 * rng.randn(n)).astype("float32"), 16000)
        out["wavs"].append(str(root / f"w{i}.wav"))
    out["lines"] = [" ".join(line.split()[:50]) for line in (corpora["text_raw"] / "news.txt").read_text().splitlines()[:6]]
    out["root"] = root
    return out


def export(ckpt, to, out, *extra):
    return subprocess.run([sys.executable, "-m", "d2v_plugin.export", str(ckpt), "--to", to, "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO)


def test_vocabulary_reads_dict_txt_like_fairseq(tmp_path):
    from fairseq.data import Dictionary

    (tmp_path / "dict.txt").write_text("▁the 10\nab 5\n<unk> 3 #fairseq:overwrite\nc 1\n")
    ours, theirs = Vocabulary.load(str(tmp_path / "dict.txt")), Dictionary.load(str(tmp_path / "dict.txt"))
    ours.add_symbol("<mask>"), theirs.add_symbol("<mask>")
    assert ours.symbols == theirs.symbols and len(ours) == len(theirs) == 9
    for line in ["▁the ab c", "zz  ▁the\tab", ""]:
        assert ours.encode_line(line).tolist() == theirs.encode_line(line, add_if_not_exist=False).tolist()
    (tmp_path / "bad.txt").write_text("ab 5\nab 3\n")
    with pytest.raises(ValueError, match="line 2: duplicate token 'ab'"):
        Vocabulary.load(str(tmp_path / "bad.txt"))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["v1", "v2"])
def test_hf_text_export_computes_the_plugins_hidden_states(ckpts, tmp_path, algo):
    from transformers import AutoModel, AutoTokenizer

    res = export(ckpts[f"text_{algo}"], "hf", tmp_path / "hf")
    assert res.returncode == 0 and "Data2VecTextModel" in res.stdout, res.stderr
    ex = d2v_plugin.load(str(ckpts[f"text_{algo}"]))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    lines = ckpts["lines"]
    for line in lines:  # the tokenizer gives the plugin's ids (sentencepiece pieces -> fairseq dictionary)
        assert tok(line)["input_ids"] == ex.read(line).tolist()
    ours = ex.extract(lines, hidden_states=True, batch_size=len(lines))
    batch = tok(lines, padding=True, return_tensors="pt")
    with torch.no_grad():
        hf = torch.stack(model(**batch, output_hidden_states=True).hidden_states, 1)  # (B, L + 1, T, D)
    assert hf.shape[1] == len(ours[0].hidden_states) == 3
    for b, h in enumerate(ours):
        assert np.abs(hf[b, :, : h.length].numpy() - h.hidden_states).max() <= TOL


@pytest.mark.slow
def test_hf_audio_export_computes_the_plugins_hidden_states(ckpts, tmp_path):
    from transformers import AutoFeatureExtractor, AutoModel

    res = export(ckpts["audio_v1"], "hf", tmp_path / "hf")
    assert res.returncode == 0 and "Data2VecAudioModel" in res.stdout, res.stderr
    ex = d2v_plugin.load(str(ckpts["audio_v1"]))
    fe = AutoFeatureExtractor.from_pretrained(str(tmp_path / "hf"))
    model = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    for path in ckpts["wavs"]:
        wav, _ = sf.read(path, dtype="float32")
        inputs = fe(wav, sampling_rate=16000, return_tensors="pt")
        # the feature extractor normalises as the plugin does (its eps differs: 1e-7 vs 1e-5)
        assert np.allclose(inputs["input_values"][0].numpy(), ex.read(path).numpy(), rtol=1e-3, atol=1e-5)
        h = ex.extract([path], hidden_states=True)[0]
        with torch.no_grad():
            hf = torch.stack(model(**inputs, output_hidden_states=True).hidden_states, 1)[0]
        assert hf.shape == h.hidden_states.shape and np.abs(hf.numpy() - h.hidden_states).max() <= TOL
    assert ex.frame_rate == 50.0 and ex.downsampling == 320


@pytest.mark.slow
@pytest.mark.parametrize("name, why", [("audio_v2", "ALiBi"), ("image_v2", "Data2VecVision")])
def test_hf_export_refuses_what_no_class_computes(ckpts, tmp_path, name, why):
    res = export(ckpts[name], "hf", tmp_path / "hf")
    assert res.returncode == 1 and why in res.stderr and "Traceback" not in res.stderr
    assert [line for line in res.stderr.splitlines() if "error" in line.lower()] == [res.stderr.strip().splitlines()[-1]]
    assert not (tmp_path / "hf").exists()


GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.mark.parametrize("name", ["v1_audio", "v1_text", "v2_text"])
def test_official_checkpoints_to_hf_match_the_official_features(name):
    """Official weights (golden fixtures) -> plugin -> transformers: the official eval features.
    The data2vec 2.0 text fixture has a prenet block (the base recipe has none): refused."""
    from transformers import Data2VecAudioModel, Data2VecTextModel

    from d2v_plugin.extract import build_model
    from d2v_plugin.hf import hf_model
    from d2v_plugin.official import convert_config, convert_state_dict

    r = torch.load(os.path.join(GOLDEN, f"{name}.pt"), weights_only=True)
    cfg = convert_config(r["config"], r["family"], len(r["extra"].get("dictionary_symbols", [])))
    state = build_model(cfg, convert_state_dict(r["state_dict"], r["family"])).state_dict()
    if name == "v2_text":
        with pytest.raises(ExportError, match="text_prenet_depth=1: context-stage blocks"):
            hf_model(cfg, state)
        return
    hf_cfg, tensors, arch = hf_model(cfg, state)
    model = (Data2VecAudioModel if arch == "Data2VecAudioModel" else Data2VecTextModel)(hf_cfg).eval()
    model.load_state_dict(tensors, strict=False)
    assert set(tensors) >= {k for k in model.state_dict() if "position_ids" not in k}
    ref = r["outputs"]["features_eval" if "v1" in name else "features"]
    inp = r["inputs"]
    with torch.no_grad():
        if name == "v1_audio":
            out = model(inp["source"], attention_mask=(~inp["padding_mask"]).long(), output_hidden_states=True)
            keep = ~ref["padding_mask"]
            assert (out.last_hidden_state - ref["x"]).abs()[keep].max() <= TOL
            return
        tokens = inp["target_tokens"] if name == "v1_text" else inp["source"]
        out = model(tokens, attention_mask=tokens.ne(1).long(), output_hidden_states=True)
    keep = tokens.ne(1)
    assert (out.last_hidden_state - ref["x"]).abs()[keep].max() <= TOL
    if name == "v1_text":  # every block output
        for ours, theirs in zip(out.hidden_states, ref["inner_states_tbc"], strict=True):
            assert (ours - theirs.transpose(0, 1)).abs()[keep].max() <= TOL


@pytest.mark.slow
def test_safetensors_export_loads_and_extracts_without_fairseq(ckpts, tmp_path):
    out = tmp_path / "st"
    res = export(ckpts["text_v2"], "safetensors", out)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out)) == ["config.json", "dict.txt", "model.safetensors", "spm.model"]
    want = d2v_plugin.load(str(ckpts["text_v2"])).extract(ckpts["lines"], layer="all")
    np.savez(tmp_path / "want.npz", *want)
    audio = tmp_path / "st_audio"
    assert export(ckpts["audio_v1"], "safetensors", audio).returncode == 0
    np.save(tmp_path / "want_audio.npy", d2v_plugin.load(str(ckpts["audio_v1"])).extract(ckpts["wavs"][:1])[0])
    script = f"""
import sys
sys.modules["fairseq"] = None  # any import of fairseq fails
import numpy as np, d2v_plugin
assert not d2v_plugin.HAS_FAIRSEQ
want = np.load({str(tmp_path / 'want.npz')!r})
ex = d2v_plugin.load({str(out)!r})
got = ex.extract({ckpts['lines']!r}, layer="all")
assert all(np.abs(g - want[f"arr_{{i}}"]).max() <= 1e-6 for i, g in enumerate(got))
h = ex.extract({ckpts['lines']!r}[:2], hidden_states=True)
assert h[0].hidden_states.shape[0] == 3 and np.abs(h[0].hidden_states[1:] - got[0]).max() <= 1e-6
pt = d2v_plugin.load({str(ckpts['audio_v1'])!r}).extract({ckpts['wavs'][:1]!r})[0]  # a checkpoint, no fairseq
st = d2v_plugin.load({str(audio)!r}).extract({ckpts['wavs'][:1]!r})[0]
want_audio = np.load({str(tmp_path / 'want_audio.npy')!r})
assert np.abs(pt - want_audio).max() <= 1e-6 and np.abs(st - want_audio).max() <= 1e-6
print("ok", [m for m in sys.modules if m.startswith("fairseq") and sys.modules[m] is not None])
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() == "ok []", res.stderr[-2000:]
    bare = f"""
import sys
sys.modules["fairseq"] = sys.modules["omegaconf"] = None  # an export needs neither
import numpy as np, d2v_plugin
st = d2v_plugin.load({str(audio)!r}).extract({ckpts['wavs'][:1]!r})[0]
assert np.abs(st - np.load({str(tmp_path / 'want_audio.npy')!r})).max() <= 1e-6
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.slow
def test_teacher_weights_are_the_ema_entry(ckpts, tmp_path):
    from d2v_plugin.extract import build_model

    path, wav = str(ckpts["audio_v1"]), ckpts["wavs"][:1]
    student = d2v_plugin.load(path).extract(wav)[0]
    teacher = d2v_plugin.load(path, weights="teacher").extract(wav)[0]
    assert np.abs(student - teacher).max() > 1e-2  # the fixture's teacher differs from its student
    ckpt = torch.load(path, weights_only=False)
    state = {k: v for k, v in ckpt["model"].items() if k != EMA_KEY}
    state.update(ckpt["model"][EMA_KEY])  # by hand: the student's state with the teacher's tensors
    by_hand = d2v_plugin.extract.Extractor(build_model(ckpt["cfg"]["model"], state), "audio", ckpt["cfg"]["task"])
    assert np.abs(by_hand.extract(wav)[0] - teacher).max() <= 1e-6
    assert export(path, "safetensors", tmp_path / "t", "--weights", "teacher").returncode == 0
    assert np.abs(d2v_plugin.load(str(tmp_path / "t")).extract(wav)[0] - teacher).max() <= 1e-6
    with pytest.raises(ExtractError, match="holds the teacher's weights, not the student's"):
        d2v_plugin.load(str(tmp_path / "t"), weights="student")
    del ckpt["model"][EMA_KEY]
    torch.save(ckpt, tmp_path / "no_teacher.pt")
    with pytest.raises(ExtractError, match="holds no EMA teacher"):
        d2v_plugin.load(str(tmp_path / "no_teacher.pt"), weights="teacher")


@pytest.mark.slow
def test_bad_export_folders_get_one_line(ckpts, tmp_path):
    good = tmp_path / "good"
    assert export(ckpts["audio_v1"], "safetensors", good).returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExtractError, match="no config.json of a d2v_plugin export"):
        d2v_plugin.load(str(empty))
    hf = tmp_path / "hf"
    assert export(ckpts["audio_v1"], "hf", hf).returncode == 0
    with pytest.raises(ExtractError, match="is not a d2v_plugin export"):
        d2v_plugin.load(str(hf))
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExtractError, match="model.safetensors cannot be read"):
        d2v_plugin.load(str(good))
    (good / "config.json").write_text("{")
    with pytest.raises(ExtractError, match="not valid JSON"):
        d2v_plugin.load(str(good))
    res = export(tmp_path / "missing.pt", "safetensors", tmp_path / "x")
    assert res.returncode == 1 and "file not found" in res.stderr.strip().splitlines()[-1] and "Traceback" not in res.stderr


def finetuned_checkpoint(pre_path, out, name, task, outputs, **fields):
    """A fine-tuned checkpoint made by the plugin's fine-tuning model classes on a pretrained
    encoder, its head random (as after fine-tuning)."""
    from d2v_plugin.extract import build_model
    from d2v_plugin.models.d2v_audio_classifier import D2vAudioClassifier, D2vAudioClassifierConfig
    from d2v_plugin.models.d2v_ctc import D2vCtcConfig, D2vCtcModel
    from d2v_plugin.models.d2v_image_classifier import D2vImageClassifier, D2vImageClassifierConfig
    from d2v_plugin.models.d2v_text_classifier import D2vTextClassifier, D2vTextClassifierConfig

    pre = torch.load(pre_path, weights_only=False)
    encoder = build_model(pre["cfg"]["model"], pre["model"])
    args = {"model": pre["cfg"]["model"], "task": pre["cfg"]["task"]}
    if name == "d2v_ctc":
        cfg = D2vCtcConfig(pretrained_args=args, layerdrop=0.0)
        model = D2vCtcModel(cfg, encoder, outputs, True)
    elif name == "d2v_audio_classifier":
        cfg = D2vAudioClassifierConfig(pretrained_args=args, layerdrop=0.0, classifier_proj_size=24, **fields)
        model = D2vAudioClassifier(cfg, encoder, outputs, True)
    elif name == "d2v_image_classifier":
        cfg = D2vImageClassifierConfig(pretrained_args=args, layerdrop=0.0)
        model = D2vImageClassifier(cfg, encoder, outputs)
    else:
        cfg = D2vTextClassifierConfig(pretrained_args=args, layerdrop=0.0, **fields)
        model = D2vTextClassifier(cfg, encoder, outputs)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("encoder."):
                p.normal_(0, 0.1)
    model_cfg = {k: getattr(v, "value", v) for k, v in dataclasses.asdict(cfg).items()}
    model_cfg["_name"] = name
    fairseq_checkpoint(out, {"model": model_cfg, "task": task}, model.state_dict())
    return model.eval()


@pytest.mark.slow
def test_hf_export_of_finetuned_models_gives_the_plugins_logits(ckpts, corpora, tmp_path):
    import shutil

    from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoModelForSequenceClassification, AutoTokenizer

    asr = tmp_path / "asr"
    asr.mkdir()
    letters = ["|", "E", "T", "A", "O"]
    (asr / "dict.ltr.txt").write_text("".join(f"{c} {9 - i}\n" for i, c in enumerate(letters)))
    ctc = finetuned_checkpoint(ckpts["audio_v1"], tmp_path / "ctc.pt", "d2v_ctc",
                               {"_name": "d2v_asr_finetuning", "data": str(asr), "labels": "ltr"}, 4 + len(letters))
    res = export(tmp_path / "ctc.pt", "hf", tmp_path / "hf_ctc")
    assert res.returncode == 0 and "Data2VecAudioForCTC" in res.stdout, res.stderr
    hf = AutoModelForCTC.from_pretrained(str(tmp_path / "hf_ctc")).eval()
    fe = AutoFeatureExtractor.from_pretrained(str(tmp_path / "hf_ctc"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf_ctc"))
    assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(list(range(4, 9))) == letters  # blank = <s> = 0
    for path in ckpts["wavs"]:
        wav, _ = sf.read(path, dtype="float32")
        with torch.no_grad():
            ours = ctc(d2v_plugin.load(str(ckpts["audio_v1"])).read(path)[None])["logits"][0]
            theirs = hf(**fe(wav, sampling_rate=16000, return_tensors="pt")).logits[0]
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= TOL
    from transformers import AutoModelForAudioClassification

    (asr / "labels.txt").write_text("yes\nno\nmaybe\n")
    for pooling in ("mean", "weighted"):
        clf = finetuned_checkpoint(ckpts["audio_v1"], tmp_path / f"ac_{pooling}.pt", "d2v_audio_classifier",
                                   {"_name": "d2v_audio_classification", "data": str(asr)}, 3, pooling=pooling)
        res = export(tmp_path / f"ac_{pooling}.pt", "hf", tmp_path / f"hf_ac_{pooling}")
        assert res.returncode == 0 and "Data2VecAudioForSequenceClassification" in res.stdout, res.stderr
        hf = AutoModelForAudioClassification.from_pretrained(str(tmp_path / f"hf_ac_{pooling}")).eval()
        assert hf.config.id2label == {0: "yes", 1: "no", 2: "maybe"} and hf.config.use_weighted_layer_sum == (pooling == "weighted")
        wavs = [sf.read(p, dtype="float32")[0] for p in ckpts["wavs"]]
        ex = d2v_plugin.load(str(ckpts["audio_v1"]))
        for path, wav in zip(ckpts["wavs"], wavs):
            with torch.no_grad():
                ours = clf(ex.read(path)[None])["logits"]
                theirs = hf(**fe(wav, sampling_rate=16000, return_tensors="pt")).logits
            assert (ours - theirs).abs().max() <= TOL, pooling
    cls_data = tmp_path / "cls"
    cls_data.mkdir()
    for name in ("dict.txt", "spm.model"):
        shutil.copy(corpora["text"] / name, cls_data / name)
    (cls_data / "labels.txt").write_text("neg\npos\n")
    clf = finetuned_checkpoint(ckpts["text_v2"], tmp_path / "cls.pt", "d2v_text_classifier",
                               {"_name": "d2v_text_classification", "data": str(cls_data)}, 2)
    res = export(tmp_path / "cls.pt", "hf", tmp_path / "hf_cls")
    assert res.returncode == 0 and "Data2VecTextForSequenceClassification" in res.stdout, res.stderr
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf_cls")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf_cls"))
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    ex = d2v_plugin.load(str(ckpts["text_v2"]))
    for line in ckpts["lines"]:
        ids = ex.read(line)
        assert tok(line)["input_ids"] == ids.tolist()
        with torch.no_grad():
            ours, theirs = clf(ids[None])["logits"], hf(**tok(line, return_tensors="pt")).logits
        assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("name", ["v1_audio", "v2_text"])
def test_official_checkpoints_load_and_export_without_fairseq(tmp_path, name):
    """An official checkpoint (golden fixture as fairseq saves it) read, extracted and exported
    to safetensors in a process where fairseq cannot be imported: the official features."""
    from .test_convert import eval_inputs, official_checkpoint

    r = official_checkpoint(os.path.join(GOLDEN, f"{name}.pt"), tmp_path / "official.pt")
    source, pad, expected = eval_inputs(r)
    torch.save({"source": source, "pad": pad, "expected": expected}, tmp_path / "io.pt")
    script = f"""
import sys
sys.modules["fairseq"] = None
import torch, d2v_plugin
from d2v_plugin.export import write_safetensors
io = torch.load({str(tmp_path / 'io.pt')!r})
write_safetensors({str(tmp_path / 'official.pt')!r}, {str(tmp_path / 'st')!r}, vocabulary={name != 'v2_text'})
for path in ({str(tmp_path / 'official.pt')!r}, {str(tmp_path / 'st')!r}):
    ex = d2v_plugin.load(path)
    with torch.no_grad():
        x = ex.model.extract_features(io["source"], io["pad"], modality=ex.modality)["x"]
    err = float((x - io["expected"]).abs().max())
    assert err <= 1e-5, (path, err)
print("ok", [m for m in sys.modules if m.startswith("fairseq") and sys.modules[m] is not None])
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok []"), res.stderr[-2000:] + res.stdout


def best_path_transcript(logits, letters):
    """By hand: the most probable label per frame, repeats merged, blanks (index 0) and the
    other specials dropped, ``|`` a space."""
    import itertools

    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + letters
    labels = [k for k, _ in itertools.groupby(logits.argmax(-1).tolist()) if k >= 4]
    return "".join(symbols[k] for k in labels).replace("|", " ").strip()


@pytest.mark.slow
def test_finetuned_models_predict_and_travel_without_fairseq(ckpts, corpora, tmp_path):
    """A fine-tuned checkpoint (CTC, audio / text / image classifier) -> d2v_plugin.load: the
    fairseq model's logits; --to safetensors -> the same; both with fairseq blocked; predict
    -> the transcript or class by hand; the CLI writes one line per input."""
    import json
    import shutil

    from PIL import Image

    from d2v_plugin.predict import Predictor

    data = tmp_path / "data"
    data.mkdir()
    letters = ["|", "E", "T", "A", "O"]
    (data / "dict.ltr.txt").write_text("".join(f"{c} {9 - i}\n" for i, c in enumerate(letters)))
    (data / "labels.txt").write_text("yes\nno\nmaybe\n")
    for name in ("dict.txt", "spm.model"):
        shutil.copy(corpora["text"] / name, data / name)
    rng = np.random.RandomState(1)
    images = []
    for i in range(3):
        Image.fromarray(rng.randint(0, 255, (40, 36, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        images.append(str(tmp_path / f"im{i}.png"))
    cases = {  # name -> (pretrained, kind, task, outputs, fields, inputs)
        "ctc": ("audio_v1", "d2v_ctc", "d2v_asr_finetuning", 4 + len(letters), {}, ckpts["wavs"]),
        "audio_cls": ("audio_v2", "d2v_audio_classifier", "d2v_audio_classification", 3, {"pooling": "weighted"}, ckpts["wavs"]),
        "text_cls": ("text_v2", "d2v_text_classifier", "d2v_text_classification", 3, {"pooling": "mean"}, ckpts["lines"][:4]),
        "image_cls": ("image_v2", "d2v_image_classifier", "d2v_image_classification", 3, {}, images),
    }
    want = {}
    for case, (pre, kind, task, outputs, fields, inputs) in cases.items():
        ckpt = tmp_path / f"{case}.pt"
        model = finetuned_checkpoint(ckpts[pre], ckpt, kind, {"_name": task, "data": str(data), "labels": "ltr"},
                                     outputs, **fields)
        p = d2v_plugin.load(str(ckpt))
        assert isinstance(p, Predictor) and p.kind == kind
        with torch.no_grad():
            source, pad = p.batch([p.read(x) for x in inputs])
            ours = model(source, padding_mask=pad)["logits"]
        assert (p.logits(source, pad)["logits"] - ours).abs().max() <= 1e-5, case
        res = export(ckpt, "safetensors", tmp_path / f"st_{case}")
        assert res.returncode == 0 and f"fine-tuned {kind}" in res.stdout, res.stderr
        st = d2v_plugin.load(str(tmp_path / f"st_{case}"))
        assert isinstance(st, Predictor) and (st.logits(source, pad)["logits"] - ours).abs().max() <= 1e-5, case
        preds = p.predict(inputs, batch_size=2)
        if kind == "d2v_ctc":
            lengths = [int((~pad[b]).sum()) if pad is not None else ours.shape[1] for b in range(len(inputs))]
            assert [r.label for r in preds] == [best_path_transcript(ours[b, :n], letters) for b, n in enumerate(lengths)]
        else:
            names = ["yes", "no", "maybe"]
            assert [r.label for r in preds] == [names[k] for k in ours.argmax(-1).tolist()]
            assert np.allclose([r.score for r in preds], torch.softmax(ours, -1).max(-1).values.numpy(), atol=1e-5)
        assert any(r.label for r in preds) and [r.label for r in st.predict(inputs)] == [r.label for r in preds]
        want[case] = [[r.label, r.score] for r in preds]
        out, given = tmp_path / f"{case}.tsv", inputs
        if kind == "d2v_text_classifier":  # the CLI reads sentences from files of lines
            (tmp_path / "lines.txt").write_text("".join(x + "\n" for x in inputs))
            given = [str(tmp_path / "lines.txt")]
        res = subprocess.run([sys.executable, "-m", "d2v_plugin.predict", "--checkpoint", str(tmp_path / f"st_{case}"),
                              "--input", *given, "--out", str(out)], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0, res.stderr
        rows = [line.split("\t") for line in out.read_text().splitlines()]
        assert [r[0] for r in rows] == [str(x) for x in inputs] and [r[1] for r in rows] == [r.label for r in preds]
    (tmp_path / "want.json").write_text(json.dumps({k: [v, cases[k][5]] for k, v in want.items()}))
    script = f"""
import json, sys
sys.modules["fairseq"] = None  # any import of fairseq fails
import numpy as np, d2v_plugin
for case, (want, inputs) in json.load(open({str(tmp_path / 'want.json')!r})).items():
    for path in ({str(tmp_path)!r} + f"/{{case}}.pt", {str(tmp_path)!r} + f"/st_{{case}}"):
        got = d2v_plugin.load(path).predict(inputs)
        assert [r.label for r in got] == [w[0] for w in want], (path, got)
        assert np.allclose([r.score for r in got], [w[1] for w in want], atol=1e-4), path
print("ok", [m for m in sys.modules if m.startswith("fairseq") and sys.modules[m] is not None])
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() == "ok []", res.stderr[-2000:]
    # the outputs' names must still fit the head; a pretraining checkpoint has no head
    (data / "labels.txt").write_text("yes\nno\n")
    with pytest.raises(ExtractError, match="labels.txt of its fine-tuning data names 2 outputs, the head has 3"):
        d2v_plugin.load(str(tmp_path / "audio_cls.pt"))
    res = subprocess.run([sys.executable, "-m", "d2v_plugin.predict", "--checkpoint", str(ckpts["audio_v1"]), "--input",
                          *ckpts["wavs"], "--out", str(tmp_path / "x.tsv")], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1 and "has no head to predict with" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.tsv").exists()


@pytest.mark.slow
def test_batching_by_length_keeps_the_input_order_and_the_features(ckpts, tmp_path):
    rng = np.random.RandomState(2)
    files = []
    for i, n in enumerate((9000, 30000, 12000, 26000, 16000)):
        sf.write(tmp_path / f"m{i}.wav", (0.1 * rng.randn(n)).astype("float32"), 16000)
        files.append(str(tmp_path / f"m{i}.wav"))
    ex = d2v_plugin.load(str(ckpts["audio_v1"]))
    batches = list(ex.batches(files, 2))
    assert [p for p, _ in batches] == [[1, 3], [4, 2], [0]]  # longest first
    alone = [ex.extract([f])[0] for f in files]
    for sort in (True, False):
        got = ex.extract(files, batch_size=2, sort=sort)
        assert [g.shape for g in got] == [a.shape for a in alone]
        assert max(np.abs(g - a).max() for g, a in zip(got, alone)) <= 1e-5
