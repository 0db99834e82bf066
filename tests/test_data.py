"""Manifests, the speech dataset and its bad-input behaviour."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v_plugin.data.audio import AudioDataError, AudioPretrainDataset
from d2v_plugin.modules.feature_extractor import parse_conv_spec
from d2v_plugin.modules.masking import MaskSettings
from d2v_plugin.prep.audio_manifest import write_manifests
from d2v_plugin.samples import wordnet_sentences


def write(path, n, rate=16000, channels=1, value=None):
    data = np.random.default_rng(0).standard_normal((n, channels)).astype("float32") * 0.1
    if value is not None:
        data[:] = value
    subtype = "FLOAT" if str(path).endswith(".wav") else "PCM_16"
    sf.write(str(path), data if channels > 1 else data[:, 0], rate, subtype=subtype)


@pytest.fixture
def audio_dir(tmp_path):
    d = tmp_path / "audio"
    (d / "sub").mkdir(parents=True)
    write(d / "a.wav", 20000)
    write(d / "sub" / "b.flac", 24000)
    write(d / "c.wav", 18000)
    write(d / "rate.wav", 20000, rate=22050)
    write(d / "stereo.wav", 20000, channels=2)
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("not audio")
    return d


def test_manifest_lists_rejects_with_reasons(audio_dir, tmp_path):
    counts = write_manifests(str(audio_dir), str(tmp_path / "m"), 0.0)
    assert counts == {"train": 3, "rejected": 4}
    lines = (tmp_path / "m" / "train.tsv").read_text().splitlines()
    assert lines[0] == str(audio_dir.resolve()) and "sub/b.flac\t24000" in lines
    rejected = dict(line.split("\t") for line in (tmp_path / "m" / "rejected.tsv").read_text().splitlines())
    assert "22050 Hz" in rejected[str(audio_dir / "rate.wav")]
    assert "2 channels" in rejected[str(audio_dir / "stereo.wav")]
    assert "unreadable" in rejected[str(audio_dir / "empty.wav")]
    assert "unreadable" in rejected[str(audio_dir / "text.wav")]


def test_manifest_valid_split(audio_dir, tmp_path):
    counts = write_manifests(str(audio_dir), str(tmp_path / "m"), 0.34)
    assert counts["train"] + counts["valid"] == 3 and counts["valid"] == 1


def manifest(tmp_path, rows, root=None):
    path = tmp_path / "train.tsv"
    path.write_text(str(root or tmp_path) + "\n" + "".join(f"{r}\t{n}\n" for r, n in rows))
    return str(path)


def test_dataset_errors_name_file_and_fix(tmp_path):
    write(tmp_path / "ok.wav", 20000)
    with pytest.raises(AudioDataError, match=r"line 3: .*missing\.wav.*rebuild the list with d2v_plugin.prep.audio_manifest"):
        AudioPretrainDataset(manifest(tmp_path, [("ok.wav", 20000), ("missing.wav", 20000)]), min_sample_size=100)
    write(tmp_path / "rate.wav", 20000, rate=8000)
    ds = AudioPretrainDataset(manifest(tmp_path, [("rate.wav", 20000)]), min_sample_size=100)
    with pytest.raises(AudioDataError, match=r"rate\.wav .*line 2.*8000 Hz, expected 16000 Hz.*Resample"):
        ds[0]
    write(tmp_path / "nan.wav", 20000, value=float("nan"))
    ds = AudioPretrainDataset(manifest(tmp_path, [("nan.wav", 20000)]), min_sample_size=100)
    with pytest.raises(AudioDataError, match="NaN"):
        ds[0]
    ds = AudioPretrainDataset(manifest(tmp_path, [("ok.wav", 19999)]), min_sample_size=100)
    with pytest.raises(AudioDataError, match="manifest says 19999"):
        ds[0]


def test_dataset_skips_short_files_and_logs(tmp_path, caplog):
    write(tmp_path / "long.wav", 20000)
    write(tmp_path / "short.wav", 500)
    ds = AudioPretrainDataset(manifest(tmp_path, [("long.wav", 20000), ("short.wav", 500)]), min_sample_size=1000)
    assert len(ds) == 1 and "skipped 1 of 2" in caplog.text
    with pytest.raises(AudioDataError, match="lower task.min_sample_size"):
        AudioPretrainDataset(manifest(tmp_path, [("short.wav", 500)]), min_sample_size=1000)


def test_collater_crops_normalises_and_draws_masks(tmp_path):
    write(tmp_path / "a.wav", 20000)
    write(tmp_path / "b.wav", 16000)
    ds = AudioPretrainDataset(manifest(tmp_path, [("a.wav", 20000), ("b.wav", 16000)]), min_sample_size=100, seed=3)
    spec = parse_conv_spec("[(16, 10, 5)] + [(16, 3, 2)] * 2")
    ds.set_masking(spec, MaskSettings("block", 0.5, 5, 0.05, clone_batch=3))
    items = [ds[0], ds[1]]
    assert abs(float(items[0]["source"].mean())) < 1e-4 and abs(float(items[0]["source"].std()) - 1) < 1e-3
    batch = ds.collater(items)
    src, mask = batch["net_input"]["source"], batch["net_input"]["mask"]
    assert src.shape == (2, 16000) and "padding_mask" not in batch["net_input"]
    assert mask.shape == (6, 799) and (mask.sum(1) == int(799 * 0.5)).all()
    assert torch.equal(ds.collater(items)["net_input"]["mask"], mask)  # reproducible


def test_wordnet_sentences():
    sentences = wordnet_sentences()
    assert len(sentences) > 10000 and all(4 <= len(s.split()) <= 14 for s in sentences[:100])


def test_batching_keeps_the_last_partial_batch(speech_corpus):
    ds = AudioPretrainDataset(str(speech_corpus / "manifest" / "train.tsv"), min_sample_size=0)
    indices = ds.ordered_indices()[:29]  # 29 = 3 * 8 + 5: fairseq alone would drop the last 5
    for mult in (1, 8):
        batches = ds.batch_by_size(indices, max_sentences=8, required_batch_size_multiple=mult)
        assert sorted(np.concatenate(batches).tolist()) == sorted(indices.tolist())
        assert max(len(b) for b in batches) <= 8


@pytest.mark.slow
def test_command_words_hold_out_voices(tmp_path):
    from d2v_plugin.data.audio import read_manifest
    from d2v_plugin.samples import COMMANDS, VOICES, build_commands

    counts = build_commands(str(tmp_path), reps=1, valid_voices=("en-gb-scotland",), test_voices=("en-us+m3",))
    assert counts == {"train": len(COMMANDS) * (len(VOICES) - 2), "valid": len(COMMANDS), "test": len(COMMANDS)}
    assert (tmp_path / "labels.txt").read_text().split() == COMMANDS
    for split in ("train", "valid", "test"):
        root, entries = read_manifest(str(tmp_path / f"{split}.tsv"))
        labels = (tmp_path / f"{split}.label").read_text().split("\n")[:-1]
        assert len(labels) == len(entries) == counts[split]
        for (rel, n, *_), word in zip(entries, labels):
            info = sf.info(os.path.join(root, rel))
            assert info.samplerate == 16000 and info.frames == int(n) and os.path.basename(rel).startswith(word + "_")
            assert ("scotland" in rel) == (split == "valid") and ("en-us_m3" in rel) == (split == "test")  # held out
