"""Joint pretraining of speech, images and text in one model (d2v_multimodal_pretraining)."""
import os
import re

import numpy as np
import pytest
import torch

from d2v_plugin.data.multimodal import MultiModalityDataset
from d2v_plugin.userdir import user_dir

from .conftest import BIN, REPO, run


class Toy(torch.utils.data.Dataset):
    def __init__(self, n, tag):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"id": i, "source": torch.tensor([self.tag])}

    def ordered_indices(self):
        return np.arange(self.n)

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        return [np.asarray(indices[i:i + max_sentences]) for i in range(0, len(indices), max_sentences)]

    def collater(self, samples):
        return {"id": torch.tensor([s["id"] for s in samples]), "net_input": {"source": torch.cat([s["source"] for s in samples])}}


def test_batches_come_from_one_modality_in_ratio():
    ds = MultiModalityDataset({"audio": Toy(40, 0), "text": Toy(40, 1)}, {"audio": 3.0, "text": 1.0}, {"audio": 2, "text": 4})
    batches = ds.batch_by_size(ds.ordered_indices(), max_sentences=8)
    kinds = [ds.locate(int(b[0]))[0] for b in batches]
    assert all(ds.locate(int(i))[0] == k for b, k in zip(batches, kinds) for i in b)  # one modality per batch
    # 20 + 10 batches in all, split 3:1: round(22.5) = 22 speech, round(7.5) = 8 text batches
    assert kinds.count("audio") == 22 and kinds.count("text") == 8
    sizes = {k: {len(b) for b, kk in zip(batches, kinds) if kk == k} for k in ("audio", "text")}
    assert sizes == {"audio": {2}, "text": {4}}
    batch = ds.collater([ds[int(i)] for i in batches[kinds.index("text")]])
    assert batch["net_input"]["modality"] == "text" and batch["net_input"]["source"].eq(1).all()


@pytest.mark.slow
def test_joint_pretraining_then_fine_tuning_each_modality(corpora, asr_data, tmp_path):
    """fairseq-hydra-train config/pretrain/multi/tiny.yaml on the three sample corpora; per-modality
    losses in the log; the jointly pretrained encoder then fine-tunes on the ASR, image and text tasks."""
    from d2v_plugin.prep.text_classification import prepare as prepare_cls

    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/pretrain/multi"),
               "--config-name", "tiny", f"common.user_dir={user_dir()}", f"task.audio_data={corpora['audio']}",
               f"task.image_data={corpora['image']}", f"task.text_data={corpora['text']}", f"checkpoint.save_dir={tmp_path / 'pt'}",
               f"hydra.run.dir={tmp_path / 'h'}", "optimization.max_update=9", "common.log_interval=3", "dataset.num_workers=0",
               "model.depth=2", "model.embed_dim=32", "model.average_top_k_layers=2", "task.text_tokens_per_sample=32",
               "task.image_batch_size=4", "task.text_batch_size=2", "task.audio_batch_size=2", "dataset.disable_validation=true"])
    for m in ("audio", "image", "text"):
        assert re.search(rf"{m}_loss=[\d.]+, {m}_target_var=[\d.]+", log), f"no {m} loss in the log"
    pt = tmp_path / "pt" / "checkpoint_last.pt"
    saved = torch.load(pt, weights_only=True)
    assert saved["cfg"]["model"]["modalities"] == "audio,image,text" and saved["task_state"]["dictionary"] is not None

    common = [f"common.user_dir={user_dir()}", f"model.pretrained_path={pt}", "optimization.max_update=2", "dataset.num_workers=0"]
    run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/asr"), "--config-name",
         "tiny", f"task.data={asr_data}", f"checkpoint.save_dir={tmp_path / 'asr'}", f"hydra.run.dir={tmp_path / 'h1'}", *common])
    run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/image"), "--config-name",
         "tiny", f"task.data={corpora['image']}", f"checkpoint.save_dir={tmp_path / 'img'}", f"hydra.run.dir={tmp_path / 'h2'}",
         "dataset.batch_size=4", "task.input_size=32", *common])
    sent = corpora["text_raw"] / "sentiment"
    prepare_cls({"train": str(sent / "train.tsv"), "valid": str(sent / "valid.tsv")}, str(corpora["text"]), str(tmp_path / "cls"))
    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/text"), "--config-name",
               "tiny", f"task.data={tmp_path / 'cls'}", f"checkpoint.save_dir={tmp_path / 'txt'}", f"hydra.run.dir={tmp_path / 'h3'}",
               "dataset.batch_size=8", *common])
    assert "| top1 " in log
    for name in ("asr", "img", "txt"):
        assert (tmp_path / name / "checkpoint_last.pt").exists()
