"""Official data2vec checkpoints: `python -m d2v_plugin.convert --from-fairseq`, and the
fine-tuning / extraction paths reading official checkpoints directly. Built from the golden
fixtures (official weights and configs, with the official outputs to compare against)."""
import os
import sys

import pytest
import torch

import d2v_plugin
from d2v_plugin.convert import main as convert_main
from d2v_plugin.userdir import user_dir

from .conftest import BIN, REPO, fairseq_checkpoint, run
from .test_golden import MODEL_FILES

NAMES = {"data2vec2": "data2vec_multi", "data2vec1_audio": "data2vec_audio", "data2vec1_text": "data2vec_text"}


def official_checkpoint(fixture, path):
    """What fairseq saves for the official model: cfg.model (with _name), model (with the teacher)."""
    r = torch.load(fixture, weights_only=True)
    fairseq_checkpoint(path, {"model": {**r["config"], "_name": NAMES[r["family"]]},
                              "task": {"_name": "audio_pretraining", "data": "/gone", "normalize": False}},
                       r["state_dict"], criterion="ModelCriterion")
    return r


def eval_inputs(r):
    if r["family"] == "data2vec1_text":
        return r["inputs"]["target_tokens"], None, r["outputs"]["features_eval"]["x"]
    ref = r["outputs"].get("features_eval", r["outputs"].get("features"))
    return r["inputs"]["source"], r["inputs"].get("padding_mask"), ref["x"]


@pytest.mark.parametrize("fixture", MODEL_FILES, ids=lambda p: p.name)
def test_converted_and_direct_official_checkpoints_reproduce_the_reference(fixture, tmp_path, capsys):
    r = official_checkpoint(fixture, tmp_path / "official.pt")
    convert_main(["--from-fairseq", str(tmp_path / "official.pt"), "--out", str(tmp_path / "converted.pt")])
    assert "with its teacher" in capsys.readouterr().out
    saved = torch.load(tmp_path / "converted.pt", weights_only=True)
    assert saved["cfg"]["model"]["_name"] == "d2v_multi" and all(v.dtype == torch.float32 for v in saved["model"]["_ema"].values())
    source, pad, expected = eval_inputs(r)
    for path in (tmp_path / "converted.pt", tmp_path / "official.pt"):  # converted, and read directly
        ex = d2v_plugin.load(str(path))
        with torch.no_grad():
            x = ex.model.extract_features(source, pad, modality=ex.modality)["x"]
        assert (x - expected).abs().max() <= 1e-5, path.name


def test_bad_official_checkpoints_are_named(tmp_path):
    torch.save({"cfg": {"model": {"_name": "wav2vec2"}}, "model": {}}, tmp_path / "w2v.pt")
    with pytest.raises(SystemExit, match="model 'wav2vec2' is not an official data2vec model"):
        convert_main(["--from-fairseq", str(tmp_path / "w2v.pt"), "--out", str(tmp_path / "o.pt")])
    torch.save({"weights": 1}, tmp_path / "odd.pt")
    with pytest.raises(SystemExit, match="not a fairseq checkpoint"):
        convert_main(["--from-fairseq", str(tmp_path / "odd.pt"), "--out", str(tmp_path / "o.pt")])


@pytest.mark.slow
def test_official_checkpoints_fine_tune_with_plugin_tasks(asr_data, tmp_path):
    """An official speech checkpoint (converted) fine-tunes with CTC; an official image one
    (read directly, no conversion step) with image classification."""
    from .test_image import make_folder, write_lists

    golden = os.path.join(REPO, "tests", "golden")
    official_checkpoint(os.path.join(golden, "v2_audio.pt"), tmp_path / "audio_official.pt")
    run([sys.executable, "-m", "d2v_plugin.convert", "--from-fairseq", str(tmp_path / "audio_official.pt"),
         "--out", str(tmp_path / "audio.pt")])
    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/asr"),
               "--config-name", "tiny", f"task.data={asr_data}", f"model.pretrained_path={tmp_path / 'audio.pt'}",
               f"common.user_dir={user_dir()}", f"checkpoint.save_dir={tmp_path / 'asr'}", f"hydra.run.dir={tmp_path / 'h1'}",
               "optimization.max_update=2", "dataset.num_workers=0", "task.normalize=false", "model.freeze_finetune_updates=0"])
    assert "done training" in log
    official_checkpoint(os.path.join(golden, "v2_image.pt"), tmp_path / "image_official.pt")
    make_folder(tmp_path / "img", per_class=4, size=32)
    write_lists(str(tmp_path / "img"), str(tmp_path / "lists"))
    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/image"),
               "--config-name", "tiny", f"task.data={tmp_path / 'lists'}", f"model.pretrained_path={tmp_path / 'image_official.pt'}",
               f"common.user_dir={user_dir()}", f"checkpoint.save_dir={tmp_path / 'img_ft'}", f"hydra.run.dir={tmp_path / 'h2'}",
               "optimization.max_update=2", "dataset.num_workers=0", "dataset.batch_size=4", "task.input_size=32"])
    assert "done training" in log and "converted on load" in log


@pytest.mark.slow
def test_converted_official_text_checkpoint_fine_tunes(tmp_path):
    """Classification data binarised with the official model's dictionary (the fixture's
    w0..w94), then d2v_text_classification from the converted checkpoint."""
    import random

    from d2v_plugin.prep.text_classification import binarise

    r = official_checkpoint(os.path.join(REPO, "tests", "golden", "v2_text.pt"), tmp_path / "official.pt")
    convert_main(["--from-fairseq", str(tmp_path / "official.pt"), "--out", str(tmp_path / "text.pt")])
    words = r["extra"]["dictionary_symbols"][4:-1]  # after <s> <pad> </s> <unk>, before <mask>
    cls = tmp_path / "cls"
    cls.mkdir()
    (cls / "dict.txt").write_text("".join(f"{w} 1\n" for w in words))
    (cls / "labels.txt").write_text("even\nodd\n")
    rng = random.Random(0)
    for split, n in (("train", 24), ("valid", 8)):
        rows = [[rng.choice(words) for _ in range(rng.randint(4, 12))] for _ in range(n)]
        (tmp_path / f"{split}.txt").write_text("".join(" ".join(row) + "\n" for row in rows))
        (cls / f"{split}.label").write_text("".join(f"{int(row[0][1:]) % 2}\n" for row in rows))
    binarise({s: str(tmp_path / f"{s}.txt") for s in ("train", "valid")}, str(cls / "dict.txt"), str(cls / "input0"))
    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/text"),
               "--config-name", "tiny", f"task.data={cls}", f"model.pretrained_path={tmp_path / 'text.pt'}",
               f"common.user_dir={user_dir()}", f"checkpoint.save_dir={tmp_path / 'ft'}", f"hydra.run.dir={tmp_path / 'h'}",
               "optimization.max_update=2", "dataset.num_workers=0", "dataset.batch_size=8", "task.max_positions=64"])
    assert "done training" in log and "| top1 " in log


def test_fairseq_roberta_converts_to_the_same_encoder(tmp_path, capsys):
    """fairseq's own RoBERTa (the text pretraining control): a checkpoint as fairseq-train saves
    it (argparse Namespace model config) converts to a d2v_multi v1 text model whose features
    equal fairseq's ``extract_features`` in eval mode; the LM head is dropped and the
    regression head is fresh, so the checkpoint fine-tunes and extracts like any other."""
    from argparse import Namespace

    from fairseq.data import Dictionary
    from fairseq.models.roberta import RobertaModel, base_architecture

    d = Dictionary()
    for i in range(40):
        d.add_symbol(f"w{i}")
    d.add_symbol("<mask>")
    args = Namespace(arch="roberta", _name="roberta", encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                     encoder_attention_heads=4, max_positions=24, tokens_per_sample=24, dropout=0.1, attention_dropout=0.1)
    base_architecture(args)
    torch.manual_seed(0)
    task = type("T", (), {"source_dictionary": d, "dictionary": d})()
    model = RobertaModel.build_model(args, task).eval()
    for p in model.parameters():  # break LayerNorm's ones/zeros so a swapped weight would show
        p.data.add_(0.02 * torch.randn_like(p))
    torch.save({"cfg": {"model": args, "task": {"_name": "masked_lm", "data": "/gone"}}, "model": model.state_dict(),
                "optimizer_history": [{"num_updates": 7}]}, tmp_path / "roberta.pt")
    convert_main(["--from-fairseq", str(tmp_path / "roberta.pt"), "--out", str(tmp_path / "conv.pt")])
    assert "roberta -> d2v_multi (text, v1), without its teacher" in capsys.readouterr().out
    tokens = torch.tensor([[0, 5, 9, 17, 30, 2, 1, 1], [0, 11, 12, 13, 14, 15, 16, 2]])
    with torch.no_grad():
        expected = model.encoder.extract_features(tokens)[0]  # (B, T, D)
        ex = d2v_plugin.load(str(tmp_path / "conv.pt"))
        x = ex.model.extract_features(tokens, tokens.eq(1), modality="text")["x"]
    real = tokens.ne(1)
    assert (x - expected)[real].abs().max() <= 1e-5
    saved = torch.load(tmp_path / "conv.pt", weights_only=True)
    assert not any("lm_head" in k for k in saved["model"]) and "final_proj.0.weight" in saved["model"]
    assert saved["optimizer_history"][-1]["num_updates"] == 7
