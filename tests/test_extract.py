"""Feature extraction (d2v_plugin.extract / d2v_plugin.load): equal to the model's own
extract_features on independently prepared inputs, for every modality and layer option."""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import d2v_plugin
from d2v_plugin.extract import ExtractError
from d2v_plugin.modules.targets import build_targets
from d2v_plugin.userdir import user_dir

from .conftest import BIN, REPO, run

TOL = 1e-6


@pytest.fixture(scope="module")
def checkpoints(pretrained, corpora, tmp_path_factory):
    """A 2-update fairseq-hydra-train checkpoint per modality (speech: the session's v2 run)."""
    root = tmp_path_factory.mktemp("extract")
    out = {"audio": pretrained("v2")[0]}
    for modality, extra in (("image", ["dataset.batch_size=4"]), ("text", ["dataset.batch_size=2", "task.tokens_per_sample=32"])):
        run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, f"config/pretrain/{modality}"),
             "--config-name", "tiny_v2", f"task.data={corpora[modality]}", f"common.user_dir={user_dir()}",
             f"checkpoint.save_dir={root / modality}", f"hydra.run.dir={root / ('h_' + modality)}", "optimization.max_update=2",
             "model.depth=2", "model.embed_dim=32", "model.average_top_k_layers=2", f"model.{modality}_decoder_dim=16",
             "dataset.num_workers=0", *extra])
        out[modality] = root / modality / "checkpoint_last.pt"
    images = (corpora["image"] / "train.tsv").read_text().splitlines()
    news = (corpora["text_raw"] / "news.txt").read_text().splitlines()[:3]
    out["inputs"] = {"image": [os.path.join(images[0], line.split("\t")[0]) for line in images[1:4]],
                     "text": [" ".join(line.split()[:20]) for line in news], "text_data": corpora["text"]}
    return out


def fairseq_model(path):
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    return models[0].eval(), cfg


def source_by_hand(modality, item, cfg, text_data=None):
    """The model input built here, not by the extractor."""
    if modality == "audio":
        wav, _ = sf.read(item, dtype="float32")
        wav = torch.from_numpy(wav)
        return F.layer_norm(wav, wav.shape) if cfg.task.normalize else wav
    if modality == "image":  # what validation feeds the model: the eval item of the image dataset
        from d2v_plugin.data.image import ImageDataset

        folder = os.path.dirname(item)
        with open(os.path.join(folder, "one.tsv"), "w") as f:
            f.write(f"{folder}\n{os.path.basename(item)}\n")
        return ImageDataset(os.path.join(folder, "one.tsv"), cfg.model.image_input_size, train=False)[0]["source"]
    import sentencepiece as spm
    from fairseq.data import Dictionary

    d = Dictionary.load(str(text_data / "dict.txt"))
    pieces = spm.SentencePieceProcessor(model_file=str(text_data / "spm.model")).encode(item, out_type=str)
    return torch.tensor([d.bos()] + [d.index(p) for p in pieces] + [d.eos()])


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["audio", "image", "text"])
def test_features_equal_extract_features(checkpoints, speech_corpus, modality):
    model, cfg = fairseq_model(checkpoints[modality])
    if modality == "audio":
        items = sorted(str(p) for p in (speech_corpus / "wav").glob("*.wav"))[:3]
    else:
        items = checkpoints["inputs"][modality]
    ex = d2v_plugin.load(str(checkpoints[modality]))
    assert ex.modality == modality
    for item in items:
        src = source_by_hand(modality, item, cfg, checkpoints["inputs"]["text_data"])
        with torch.no_grad():
            ref = model.extract_features(src[None], modality=modality)
            first = model.extract_features(src[None], modality=modality, layer=0)["x"][0]
        K = model.cfg.average_top_k_layers
        E = model.modality_encoders[modality].num_extra
        targets = build_targets([y[:, E:] for y in ref["layer_results"][-K:]], K, model.cfg.target_layer_norm,
                                model.cfg.target_final_norm)[0]
        expected = {"last": ref["x"][0], "1": first, "avg_top_k": targets}
        for layer, want in expected.items():
            got = ex.extract([item], layer=layer)[0]
            assert got.shape == tuple(want.shape) and np.abs(got - want.numpy()).max() <= TOL, (modality, layer)
            pooled = ex.extract([item], layer=layer, pool="mean")[0]
            assert np.abs(pooled - want.mean(0).numpy()).max() <= TOL
        every = ex.extract([item], layer="all")[0]
        assert every.shape == (model.cfg.depth,) + tuple(ref["x"][0].shape)
        assert np.abs(every[0] - first.numpy()).max() <= TOL and np.abs(every[-1] - ref["x"][0].numpy()).max() <= TOL
    # batching pads, then removes the padding again: the same features
    one = [ex.extract([i])[0] for i in items]
    for a, b in zip(one, ex.extract(items, batch_size=3)):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4


@pytest.mark.slow
def test_cli_writes_npz_and_folder(checkpoints, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(checkpoints["inputs"]["text"]) + "\n")
    base = [sys.executable, "-m", "d2v_plugin.extract", "--checkpoint", str(checkpoints["text"]), "--input", str(lines)]
    out = run([*base, "--layer", "all", "--pool", "mean", "--out", str(tmp_path / "f.npz")])
    assert "wrote 3 feature arrays" in out
    z = np.load(tmp_path / "f.npz")
    assert list(z["ids"]) == checkpoints["inputs"]["text"] and z["0"].shape == (2, 32)
    run([*base, "--out", str(tmp_path / "folder"), "--batch-size", "2"])
    assert sorted(os.listdir(tmp_path / "folder")) == ["000000.npy", "000001.npy", "000002.npy", "ids.txt"]
    assert np.load(tmp_path / "folder" / "000001.npy").shape[1] == 32


@pytest.mark.slow
def test_unreadable_inputs_and_mismatched_modality(checkpoints, tmp_path):
    (tmp_path / "bad.wav").write_text("not audio")
    ex = d2v_plugin.load(str(checkpoints["audio"]))
    with pytest.raises(ExtractError, match=r"bad\.wav: cannot be read as audio input .*cannot read audio"):
        ex.extract([str(tmp_path / "bad.wav")])
    image = checkpoints["inputs"]["image"][0]
    with pytest.raises(ExtractError, match=r"\.png: cannot be read as audio input for .* \(audio model\)"):
        ex.extract([image])
    with pytest.raises(ExtractError, match="has no audio encoder \\(modalities=text\\)"):
        d2v_plugin.load(str(checkpoints["text"]), modality="audio")
    with pytest.raises(ExtractError, match="--layer '9': choose last, N \\(1..2\\)"):
        ex.extract([image], layer="9")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    out = subprocess.run([sys.executable, "-m", "d2v_plugin.extract", "--checkpoint", str(checkpoints["text"]), "--input",
                          str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "x.npz")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "latin1.txt: not UTF-8 text" in out.stderr
