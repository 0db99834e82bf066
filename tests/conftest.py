"""Shared tiny models and a small real speech corpus (espeak-ng reading WordNet)."""
import os
import subprocess
import sys

import pytest

from d2v_plugin.models.config import D2vMultiConfig

CORPUS_FIXTURES = {"speech_corpus", "pretrained", "asr_data", "corpora"}  # built by subprocesses: the slow tier


def pytest_collection_modifyitems(items):
    """A test that needs a generated corpus belongs to the slow (integration) tier."""
    for item in items:
        if CORPUS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY = dict(
    depth=2, embed_dim=32, num_heads=4, encoder_dropout=0.0, attention_dropout=0.0, post_mlp_dropout=0.0,
    layerdrop=0.0, audio_prenet_dropout=0.0, decoder_input_dropout=0.0, clone_batch=2, average_top_k_layers=2,
    audio_conv_feature_layers="[(16, 10, 5)] + [(16, 3, 2)] * 2", audio_conv_pos_width=8, audio_conv_pos_depth=2,
    audio_conv_pos_groups=4, audio_decoder_dim=16, audio_decoder_kernel=3, audio_decoder_layers=2,
    audio_decoder_groups=4, ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10,
)


def tiny_cfg(**overrides) -> D2vMultiConfig:
    kw = dict(TINY)
    if overrides.get("algorithm") == "v1":
        kw.update(clone_batch=1, audio_mask_type="span", audio_mask_prob=0.65, audio_mask_length=10, audio_use_alibi=False)
    kw.update(overrides)
    return D2vMultiConfig(**kw)


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory):
    """~40 synthetic utterances (1.5-4 s) with manifests: DIR/wav, DIR/manifest/{train,valid}.tsv."""
    root = tmp_path_factory.mktemp("speech")
    py = sys.executable
    subprocess.run([py, "-m", "d2v_plugin.samples", "speech", "--out", str(root), "--n", "40"], check=True, cwd=REPO)
    subprocess.run([py, "-m", "d2v_plugin.prep.audio_manifest", str(root / "wav"), "--dest", str(root / "manifest"),
                    "--valid-percent", "0.2"], check=True, cwd=REPO)
    return root


TINY_FLAGS = [
    "--depth", "2", "--embed-dim", "32", "--num-heads", "4", "--average-top-k-layers", "2", "--layerdrop", "0",
    "--audio-conv-feature-layers", "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2",
    "--audio-conv-pos-width", "8", "--audio-conv-pos-depth", "2", "--audio-conv-pos-groups", "4",
    "--audio-decoder-dim", "16", "--audio-decoder-layers", "1", "--audio-decoder-groups", "4",
    "--max-sample-size", "48000", "--min-sample-size", "16000", "--required-batch-size-multiple", "1",
    "--ema-decay", "0.9", "--ema-end-decay", "0.99", "--ema-anneal-end-step", "10",
]
V1_FLAGS = ["--algorithm", "v1", "--clone-batch", "1", "--audio-mask-type", "span", "--audio-mask-prob", "0.65",
            "--audio-mask-length", "10", "--audio-use-alibi", "false", "--ema-copy-pos-conv", "true"]


def train_args(data, *extra):
    from d2v_plugin.userdir import user_dir

    return [str(data), "--user-dir", user_dir(), "--task", "d2v_audio_pretraining", "--arch", "d2v_multi",
            "--criterion", "d2v", "--optimizer", "adam", "--lr", "0.001", "--lr-scheduler", "fixed",
            "--max-tokens", "100000", "--num-workers", "0", "--seed", "1", *TINY_FLAGS, *extra]


def fairseq_checkpoint(path, cfg, state, criterion="D2vCriterion"):
    """What fairseq's save_checkpoint writes (the entries its loader upgrades) -> str(path)."""
    import torch

    torch.save({"cfg": cfg, "model": state, "extra_state": {"train_iterator": {"epoch": 1}}, "last_optimizer_state": None,
                "optimizer_history": [{"criterion_name": criterion, "optimizer_name": "Adam",
                                       "lr_scheduler_state": {}, "num_updates": 1}]}, path)
    return str(path)


def run(cmd, cwd=REPO):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def pretrained(speech_corpus, tmp_path_factory):
    """pretrained(algorithm) -> (checkpoint_last.pt of a 4-update tiny fairseq-train run, its log); built once."""
    made = {}

    def get(algorithm: str):
        if algorithm not in made:
            out = tmp_path_factory.mktemp(f"pretrained_{algorithm}")
            extra = V1_FLAGS if algorithm == "v1" else ["--clone-batch", "2"]
            log = run([os.path.join(BIN, "fairseq-train"), *train_args(speech_corpus / "manifest", *extra),
                       "--max-update", "4", "--save-dir", str(out), "--log-format", "simple", "--log-interval", "1"])
            made[algorithm] = (out / "checkpoint_last.pt", log)
        return made[algorithm]

    return get


@pytest.fixture(scope="session")
def asr_data(speech_corpus, tmp_path_factory):
    """The speech corpus's manifests with letter labels: {train,valid}.{tsv,ltr,wrd}, dict.ltr.txt."""
    out = tmp_path_factory.mktemp("asr")
    for split in ("train", "valid"):
        (out / f"{split}.tsv").write_text((speech_corpus / "manifest" / f"{split}.tsv").read_text())
    run([sys.executable, "-m", "d2v_plugin.prep.asr_labels", str(speech_corpus / "transcripts.tsv"), "--manifest-dir", str(out)])
    return out


@pytest.fixture(scope="session")
def corpora(speech_corpus, tmp_path_factory):
    """One small training set per modality."""
    from d2v_plugin.prep.text import prepare as prepare_text

    from .test_image import make_folder, write_lists

    root = tmp_path_factory.mktemp("corpora")
    make_folder(root / "img", per_class=8, size=32)
    write_lists(str(root / "img"), str(root / "lists"))
    run([sys.executable, "-m", "d2v_plugin.samples", "text", "--out", str(root / "text"), "--n", "30"])
    prepare_text(str(root / "text" / "news.txt"), str(root / "text_data"), vocab_size=300, valid_percent=0.1)
    return {"audio": speech_corpus / "manifest", "image": root / "lists", "text": root / "text_data", "text_raw": root / "text"}
