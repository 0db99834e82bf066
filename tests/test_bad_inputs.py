"""The bad-input matrix (README, "Bad inputs"): one test per row. Each case gives a clear
error naming the file/line/key and the fix, or a counted, logged skip where skipping is
the documented behaviour."""
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from d2v_plugin.data.audio import AudioDataError, AudioPretrainDataset, load_audio
from d2v_plugin.data.image import ImageDataError, ImageDataset, load_image
from d2v_plugin.models.d2v_multi import D2vMultiModel
from d2v_plugin.prep.audio_manifest import write_manifests
from d2v_plugin.prep.image_folder import write_lists
from d2v_plugin.prep.text import prepare as prepare_text
from d2v_plugin.userdir import user_dir

from .conftest import BIN, REPO, fairseq_checkpoint, tiny_cfg

AUDIO_FIX = "rebuild the list with d2v_plugin.prep.audio_manifest"


def wav(path, n, rate=16000, channels=1, value=None):
    data = np.random.default_rng(0).standard_normal((n, channels)).astype("float32") * 0.1
    if value is not None:
        data[:] = value
    sf.write(str(path), data if channels > 1 else data[:, 0], rate, subtype="FLOAT")
    return path


def manifest(tmp_path, rows):
    path = tmp_path / "train.tsv"
    path.write_text(str(tmp_path) + "\n" + "".join(f"{r}\t{n}\n" for r, n in rows))
    return str(path)


def first_item(tmp_path, name, n):
    return AudioPretrainDataset(manifest(tmp_path, [(name, n)]), min_sample_size=0)[0]


# -- audio -----------------------------------------------------------------------------
def test_audio_unreadable_file(tmp_path):
    (tmp_path / "bad.wav").write_text("not audio")
    with pytest.raises(AudioDataError, match=r"bad\.wav \(.*train\.tsv, line 2\): cannot read audio.*Re-encode"):
        first_item(tmp_path, "bad.wav", 100)
    assert "unreadable" in (rejected_by_prep(tmp_path, "bad.wav"))


def test_audio_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioDataError, match=r"empty\.wav .*cannot read audio"):
        first_item(tmp_path, "empty.wav", 100)
    wav(tmp_path / "zero.wav", 0)
    with pytest.raises(AudioDataError, match=r"zero\.wav .*no samples; remove it"):
        load_audio(str(tmp_path / "zero.wav"), 16000, "here")


def test_audio_wrong_sample_rate(tmp_path):
    wav(tmp_path / "r.wav", 8000, rate=8000)
    with pytest.raises(AudioDataError, match=r"r\.wav .*8000 Hz, expected 16000 Hz. Resample"):
        first_item(tmp_path, "r.wav", 8000)
    assert "8000 Hz" in rejected_by_prep(tmp_path, "r.wav")


def test_audio_stereo(tmp_path, caplog):
    wav(tmp_path / "s.wav", 1000, channels=2)
    with caplog.at_level(logging.WARNING):
        item = first_item(tmp_path, "s.wav", 1000)
    assert item["source"].shape == (1000,) and "2 channels, averaged to mono" in caplog.text
    assert "2 channels" in rejected_by_prep(tmp_path, "s.wav")  # prep lists it for re-encoding


def test_audio_nan_or_inf_samples(tmp_path):
    for value in (float("nan"), float("inf")):
        wav(tmp_path / "n.wav", 1000, value=value)
        with pytest.raises(AudioDataError, match=r"n\.wav .*NaN or infinite samples"):
            first_item(tmp_path, "n.wav", 1000)


@pytest.mark.slow
def test_audio_shorter_than_receptive_field(tmp_path, caplog):
    wav(tmp_path / "long.wav", 2000)
    wav(tmp_path / "short.wav", 300)
    with caplog.at_level(logging.WARNING):
        ds = AudioPretrainDataset(manifest(tmp_path, [("long.wav", 2000), ("short.wav", 300)]), min_sample_size=400)
    assert len(ds) == 1 and "skipped 1 of 2 files shorter than min_sample_size=400" in caplog.text
    # a min_sample_size below the receptive field is a config error, named with the value to set
    from .conftest import train_args

    out = subprocess.run([os.path.join(BIN, "fairseq-train"), *train_args(manifest_dir(tmp_path), "--min-sample-size", "100")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "task.min_sample_size=100 is shorter than the feature extractor's receptive field (400 samples)" in out.stderr


def manifest_dir(tmp_path):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "train.tsv").write_text((tmp_path / "train.tsv").read_text())
    (tmp_path / "m" / "valid.tsv").write_text((tmp_path / "train.tsv").read_text())
    return tmp_path / "m"


def test_audio_manifest_line_points_to_missing_file(tmp_path):
    wav(tmp_path / "ok.wav", 1000)
    with pytest.raises(AudioDataError, match=rf"line 3: .*missing\.wav.*{AUDIO_FIX}"):
        AudioPretrainDataset(manifest(tmp_path, [("ok.wav", 1000), ("missing.wav", 1000)]), min_sample_size=0)


def test_audio_manifest_length_disagrees_with_file(tmp_path):
    wav(tmp_path / "ok.wav", 1000)
    with pytest.raises(AudioDataError, match=r"ok\.wav .*has 1000 samples but the manifest says 999; rebuild"):
        first_item(tmp_path, "ok.wav", 999)


def rejected_by_prep(tmp_path, name) -> str:
    out = tmp_path / "prep"
    wav(tmp_path / "good_for_prep.wav", 1000)
    write_manifests(str(tmp_path), str(out), 0.0)
    rejected = dict(line.split("\t") for line in (out / "rejected.tsv").read_text().splitlines())
    return rejected[str(tmp_path / name)]


def test_audio_truncated_wav_header_and_data_disagree(tmp_path):
    """libsndfile reads a wav cut short of its header's data size without complaint."""
    sf.write(str(tmp_path / "full.wav"), np.zeros(16000, dtype="float32"), 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    assert sf.info(str(tmp_path / "cut.wav")).frames < 16000  # what the old check trusted
    assert "truncated: the header's data chunk says 16000 frames declared, 7989 present" in rejected_by_prep(tmp_path, "cut.wav")
    with pytest.raises(AudioDataError, match=r"cut\.wav \(.*line 2\): truncated: .*re-copy or re-encode"):
        first_item(tmp_path, "cut.wav", 7989)
    assert load_audio(str(tmp_path / "full.wav"), 16000, "here").shape == (16000,)


def test_audio_long_file_is_cropped_not_dropped(tmp_path, caplog):
    """A 60 s file in a pretraining manifest: fairseq's size filter compared the whole file
    with max_positions (= max_tokens) and dropped it; pretraining crops it instead."""
    wav(tmp_path / "long.wav", 16000 * 60)
    wav(tmp_path / "short.wav", 32000)
    ds = AudioPretrainDataset(manifest(tmp_path, [("long.wav", 16000 * 60), ("short.wav", 32000)]),
                              max_sample_size=64000, min_sample_size=16000)
    with caplog.at_level(logging.WARNING):
        kept, ignored = ds.filter_indices_by_size(np.arange(2), 400000)
    assert list(kept) == [0, 1] and ignored == [] and "skipped" not in caplog.text
    batch = ds.collater([ds[0], ds[1]])
    assert batch["net_input"]["source"].shape == (2, 32000)  # cropped to the shorter (no padding)
    kept, ignored = ds.filter_indices_by_size(np.arange(2), 40000)  # still too long after cropping: named
    assert list(kept) == [1] and ignored == [0] and "skipped 1 files longer than max_positions=40000" in caplog.text


# -- images ----------------------------------------------------------------------------
def image_list(tmp_path, names):
    (tmp_path / "list.tsv").write_text(str(tmp_path) + "\n" + "".join(f"{n}\n" for n in names))
    return str(tmp_path / "list.tsv")


def image_prep_rejects(tmp_path, name):
    (tmp_path / "train").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "good.png")
    os.replace(tmp_path / name, tmp_path / "train" / name)
    write_lists(str(tmp_path), str(tmp_path / "lists"))
    return (tmp_path / "lists" / "rejected.tsv").read_text()


def test_image_truncated_file(tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDataError, match=r"t\.png \(.*list\.tsv, line 2\): cannot decode image.*Re-save"):
        ImageDataset(image_list(tmp_path, ["t.png"]), 16, train=False)[0]
    assert "t.png" in image_prep_rejects(tmp_path, "t.png")


def test_image_not_an_image(tmp_path):
    (tmp_path / "x.jpg").write_text("not an image")
    with pytest.raises(ImageDataError, match=r"x\.jpg .*cannot decode image"):
        ImageDataset(image_list(tmp_path, ["x.jpg"]), 16, train=False)[0]
    assert "x.jpg" in image_prep_rejects(tmp_path, "x.jpg")


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_image_grayscale_cmyk_alpha_become_rgb(tmp_path, mode):
    ext = "tif" if mode in ("CMYK", "I;16") else "png"
    Image.new(mode, (12, 10)).save(tmp_path / f"m.{ext}")
    img = load_image(str(tmp_path / f"m.{ext}"), "here")
    assert img.shape == (3, 10, 12) and img.dtype == torch.float32 and 0 <= float(img.min()) <= float(img.max()) <= 1


def test_image_16_bit_keeps_its_full_range(tmp_path):
    """A 16-bit grayscale PNG: Pillow's convert("RGB") clipped every value above 255 (near white)."""
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    img = load_image(str(tmp_path / "g16.png"), "here")
    assert img.shape == (3, 48, 64)
    assert torch.allclose(img[1], torch.from_numpy(ramp / 65535.0).float(), atol=1e-6)
    assert float(img.mean()) == pytest.approx(ramp.mean() / 65535.0, abs=1e-4)  # ~0.49, not ~1
    Image.fromarray(np.full((4, 4), 2.5, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ImageDataError, match=r"f\.tif .*float image with values in \[2\.5, 2\.5\]"):
        load_image(str(tmp_path / "f.tif"), "here")


def test_image_tiny_image_is_upsampled(tmp_path):
    Image.new("RGB", (2, 3), (255, 0, 0)).save(tmp_path / "tiny.png")
    for train in (True, False):
        x = ImageDataset(image_list(tmp_path, ["tiny.png"]), 32, train=train)[0]["source"]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


# -- text ------------------------------------------------------------------------------
@pytest.mark.slow
def test_text_empty_line_long_line_undecodable_bytes(tmp_path):
    good = [f"sentence number {i} with a few more words in it" for i in range(30)]
    raw = tmp_path / "raw.txt"
    raw.write_bytes("\n".join(good[:5]).encode() + b"\n\n\xff\xfe broken\n" + b"x " * 300 + b"\n" + "\n".join(good[5:]).encode())
    counts = prepare_text(str(raw), str(tmp_path / "data"), vocab_size=60, valid_percent=0.1, max_chars=200)
    skipped = (tmp_path / "data" / "skipped.tsv").read_text().splitlines()
    assert counts["skipped"] == 3 and counts["train"] + counts["valid"] == 30
    assert [s.split("\t")[0] for s in skipped] == ["6", "7", "8"]
    assert "empty line" in skipped[0] and "undecodable bytes" in skipped[1] and "> --max-chars 200" in skipped[2]


@pytest.mark.slow
def test_text_line_longer_than_max_positions(tmp_path, caplog):
    """Pretraining cuts the token stream into blocks (break mode none); a sentence longer than
    max_positions in classification is cut, counted and logged."""
    from fairseq.data import Dictionary

    from d2v_plugin.data.text import SentenceDataset
    from d2v_plugin.prep.text_classification import prepare as prepare_cls

    lines = [" ".join(f"tok{(i * 7 + j) % 50}" for j in range(5 if i % 2 else 40)) for i in range(40)]
    (tmp_path / "raw.txt").write_text("\n".join(lines) + "\n")
    prepare_text(str(tmp_path / "raw.txt"), str(tmp_path / "data"), vocab_size=40, valid_percent=0.1)
    (tmp_path / "t.tsv").write_text("".join(f"{line}\t{'ab'[i % 2]}\n" for i, line in enumerate(lines)))
    prepare_cls({"train": str(tmp_path / "t.tsv"), "valid": str(tmp_path / "t.tsv")}, str(tmp_path / "data"), str(tmp_path / "cls"))
    d = Dictionary.load(str(tmp_path / "cls" / "dict.txt"))
    with caplog.at_level(logging.WARNING):
        ds = SentenceDataset(str(tmp_path / "cls"), "train", d, 16, regression=False)
    assert "20 of 40 samples longer than 16 tokens are cut" in caplog.text
    assert max(len(ds[i]["source"]) for i in range(len(ds))) == 16


# -- configs ---------------------------------------------------------------------------
def hydra_train(*overrides):
    return subprocess.run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/pretrain/audio"),
                           "--config-name", "tiny_v2", f"common.user_dir={user_dir()}", *overrides],
                          cwd=REPO, capture_output=True, text=True)


@pytest.mark.slow
def test_config_unknown_key(tmp_path):
    out = hydra_train(f"task.data={tmp_path}", "model.depht=2", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "Could not override 'model.depht'" in out.stderr
    assert "'model.depht' is not a field of model; did you mean model.depth?" in out.stderr
    flags = subprocess.run([os.path.join(BIN, "fairseq-train"), str(tmp_path), "--user-dir", user_dir(), "--task",
                            "d2v_audio_pretraining", "--arch", "d2v_multi", "--depht", "2"], capture_output=True, text=True)
    assert flags.returncode != 0 and "unrecognized arguments: --depht 2" in flags.stderr


@pytest.mark.slow
def test_config_field_missing_from_the_yaml_is_a_plain_override(tmp_path):
    """Every field of the task/model/criterion/optimizer/scheduler: no `+` needed (Hydra
    asked for `+model.pooling=mean`, the same answer as for a typo)."""
    out = subprocess.run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/text"),
                          "--config-name", "tiny", "task.data=D", "model.pretrained_path=P", "common.user_dir=U",
                          "model.pooling=mean", "lr_scheduler.end_learning_rate=0.01", "task.seed=3", "--cfg", "job"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pooling: mean" in out.stdout and "end_learning_rate: 0.01" in out.stdout and "seed: 3" in out.stdout


def test_config_shipped_yamls_list_every_field():
    """d2v_plugin/conf holds every field of every dataclass a shipped YAML names, and is current."""
    from d2v_plugin.hydra_defaults import KINDS
    from d2v_plugin.hydra_defaults import main as defaults_main

    defaults_main(["--check"])
    from omegaconf import OmegaConf

    for folder, _, files in os.walk(os.path.join(REPO, "config")):
        for name in files:
            cfg = OmegaConf.load(os.path.join(folder, name))
            assert cfg.hydra.job.chdir is False and "pkg://d2v_plugin.conf" in cfg.hydra.searchpath, name
            listed = set()
            for entry in cfg.defaults:
                if entry != "_self_":
                    (group, value), = entry.items()
                    listed.add(group.split("@")[1])
                    assert value == cfg[group.split("@")[1]]["_name"], (name, group)
            assert listed == {k for k in KINDS if isinstance(cfg.get(k), type(cfg)) and cfg[k].get("_name")}, name


def test_config_typo_names_the_closest_field():
    from omegaconf import OmegaConf

    from d2v_plugin.hydra_defaults import suggest_fields

    cfg = OmegaConf.create({"model": {"pooling": "first", "dropout": 0.1, "layerdrop": 0.0}})
    msg = suggest_fields("Could not override 'model.poolng'.\nTo append to your config use +model.poolng=mean", cfg)
    assert msg.endswith("did you mean model.pooling?")
    assert "no similar field name" in suggest_fields("Could not override 'model.zzzzzz'.", cfg)


@pytest.mark.slow
def test_config_missing_required_path(tmp_path):
    out = hydra_train(f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "task.data is not set: give the data folder" in out.stderr


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=5), "num_heads"),
    (dict(average_top_k_layers=3), "average_top_k_layers=3"),
    (dict(audio_mask_prob=1.5), "mask_prob=1.5"),
    (dict(algorithm="v3"), "algorithm='v3'"),
])
def test_config_inconsistent_sizes(bad, message):
    with pytest.raises(ValueError, match=message):
        D2vMultiModel(tiny_cfg(**bad))


def test_labels_count_and_unknown_characters(tmp_path):
    """A label file with fewer lines than its manifest, or a symbol outside the letter
    dictionary, is one error naming the file (and the line)."""
    from fairseq.data import Dictionary

    from d2v_plugin.data.audio import LabelledAudioDataset

    rows = [(wav(tmp_path / f"{i}.wav", 16000).name, 16000) for i in range(3)]
    tsv = manifest(tmp_path, rows)
    letters = Dictionary()
    for c in "AB|":
        letters.add_symbol(c)
    (tmp_path / "short.ltr").write_text("A |\nB |\n")
    with pytest.raises(AudioDataError, match=r"short.ltr.* has 2 lines but .* lists 3 files"):
        LabelledAudioDataset(tsv, str(tmp_path / "short.ltr"), letters)
    (tmp_path / "bad.ltr").write_text("A |\nA # |\nB |\n")
    with pytest.raises(AudioDataError, match=r"bad.ltr, line 2: symbols \['#'\] not in the dictionary"):
        LabelledAudioDataset(tsv, str(tmp_path / "bad.ltr"), letters)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


# -- checkpoints and tools ---------------------------------------------------------------
def tiny_audio_checkpoint(path, nan=False):
    import dataclasses

    cfg = tiny_cfg()
    model = D2vMultiModel(cfg)
    state = model.state_dict()
    if nan:
        state = {k: (v.fill_(float("nan")) if k.endswith("blocks.0.mlp.fc1.weight") else v) if torch.is_tensor(v) else v
                 for k, v in state.items()}
    return fairseq_checkpoint(path, {"model": {**dataclasses.asdict(cfg), "_name": "d2v_multi"},
                                     "task": {"_name": "d2v_audio_pretraining", "normalize": True, "sample_rate": 16000}}, state)


def test_checkpoint_not_a_checkpoint_truncated_or_wrong_kind(tmp_path):
    """extract, convert and fine-tuning (model.pretrained_path) name what the file is: no traceback."""
    from d2v_plugin.convert import main as convert_main
    from d2v_plugin.extract import main as extract_main
    from d2v_plugin.models.pretrained import PretrainedCheckpointError, read_pretrained

    good = tiny_audio_checkpoint(tmp_path / "good.pt")
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint\n")
    (tmp_path / "cut.pt").write_bytes(open(good, "rb").read()[:5000])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "tensors.pt")
    fairseq_checkpoint(tmp_path / "ft.pt", {"model": {"_name": "d2v_ctc", "pretrained_path": "pt/checkpoint_last.pt"}}, {})
    cases = {"notes.pt": "is not a PyTorch checkpoint (it starts with 'hello, not a che')",
             "cut.pt": "is truncated or corrupted (5,000 bytes of a zip archive whose end is missing",
             "empty.pt": "is empty (0 bytes)",
             "tensors.pt": "is a torch file but not a fairseq checkpoint (a dict with keys ['weights'], no 'model' entry)",
             "ft.pt": "it is a fine-tuned d2v_ctc checkpoint: use the pretraining checkpoint it started from "
                      "(its model.pretrained_path: pt/checkpoint_last.pt)",
             "missing.pt": "not found"}
    for name, expected in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(SystemExit) as e:
            extract_main(["--checkpoint", path, "--input", good, "--out", str(tmp_path / "f.npz")])
        # extract reads fine-tuned checkpoints too (their encoder): this one has no weights at all
        says = "a fine-tuned d2v_ctc checkpoint without its weights (encoder.* missing" if name == "ft.pt" else expected
        assert str(e.value).startswith("error: ") and says in str(e.value) and "\n" not in str(e.value), (name, e.value)
        with pytest.raises(PretrainedCheckpointError, match=re.escape(expected)):
            read_pretrained(path, "audio")
        if name != "ft.pt":
            with pytest.raises(SystemExit, match=re.escape(expected)):
                convert_main(["--from-fairseq", path, "--out", str(tmp_path / "o.pt")])
    assert not (tmp_path / "f.npz").exists()


def test_extract_input_shorter_than_receptive_field_and_nan_features(tmp_path):
    from d2v_plugin.extract import main as extract_main

    good = tiny_audio_checkpoint(tmp_path / "good.pt")
    wav(tmp_path / "tiny.wav", 10)  # the tiny extractor's receptive field is 40 samples
    wav(tmp_path / "ok.wav", 4000)
    short = r"tiny\.wav: cannot be read as audio input .*10 samples, shorter than the feature extractor's receptive field \(40 samples\)"
    with pytest.raises(SystemExit, match=short):
        extract_main(["--checkpoint", good, "--input", str(tmp_path / "ok.wav"), str(tmp_path / "tiny.wav"),
                      "--out", str(tmp_path / "f.npz")])
    bad = tiny_audio_checkpoint(tmp_path / "nan.pt", nan=True)
    with pytest.raises(SystemExit, match=r"ok\.wav: the features have NaN or infinite values .*diverged run"):
        extract_main(["--checkpoint", bad, "--input", str(tmp_path / "ok.wav"), "--out", str(tmp_path / "f.npz")])
    assert not (tmp_path / "f.npz").exists()


def test_tools_refuse_to_write_empty_output(tmp_path):
    """prep.text_classification with no usable row and samples --n 0 exit non-zero, naming the input."""
    from d2v_plugin.prep.text_classification import prepare as prepare_cls
    from d2v_plugin.samples import main as samples_main

    (tmp_path / "raw.txt").write_text("".join(f"line {i} with some words\n" for i in range(40)))
    prepare_text(str(tmp_path / "raw.txt"), str(tmp_path / "data"), vocab_size=40, valid_percent=0.1)
    (tmp_path / "bad.tsv").write_text("no label here\n\n")
    (tmp_path / "ok.tsv").write_text("a sentence\tpos\nanother one\tneg\n")
    with pytest.raises(SystemExit, match=r"no usable `sentence<TAB>label` row in .*bad\.tsv \(train\)"):
        prepare_cls({"train": str(tmp_path / "bad.tsv"), "valid": str(tmp_path / "ok.tsv")}, str(tmp_path / "data"), str(tmp_path / "c"))
    (tmp_path / "unseen.tsv").write_text("a sentence\tmaybe\n")
    with pytest.raises(SystemExit, match=r"unseen\.tsv \(valid\): every row's label is unusable"):
        prepare_cls({"train": str(tmp_path / "ok.tsv"), "valid": str(tmp_path / "unseen.tsv")}, str(tmp_path / "data"), str(tmp_path / "c"))
    with pytest.raises(SystemExit):
        samples_main(["speech", "--out", str(tmp_path / "s"), "--n", "0"])
    assert not (tmp_path / "s").exists()
