"""Shared tiny models and a small real speech corpus (espeak-ng reading WordNet)."""
import os
import subprocess
import sys

import pytest

from d2v_plugin.models.config import D2vMultiConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
