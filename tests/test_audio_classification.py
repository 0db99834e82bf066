"""Audio classification (d2v_audio_classification / d2v_audio_classifier): real fairseq
binaries on the spoken-command sample, the metrics' arithmetic, and bad labels."""
import os

import pytest
import torch

from d2v_plugin.data.audio import AudioDataError, ClassifiedAudioDataset
from d2v_plugin.userdir import user_dir

from .conftest import BIN, REPO, run


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    from d2v_plugin.samples import build_commands

    out = tmp_path_factory.mktemp("commands")
    build_commands(str(out), reps=1)
    return out


def test_macro_f1_is_computed_from_counts_summed_over_batches():
    """Two validation batches: F1 from the summed counts, not the mean of per-batch F1s."""
    from fairseq import metrics

    from d2v_plugin.criterions.classification import D2vClassificationCriterion

    # 3 classes; batch 1: class 0 right twice, class 1 predicted as 2 once; batch 2: class 2 right, class 1 right
    b1 = {"sample_size": 3, "loss": 1.0, "counted": 3, "correct1": 2, "tp0": 2, "fp0": 0, "fn0": 0,
          "tp1": 0, "fp1": 0, "fn1": 1, "tp2": 0, "fp2": 1, "fn2": 0}
    b2 = {"sample_size": 2, "loss": 1.0, "counted": 2, "correct1": 2, "tp0": 0, "fp0": 0, "fn0": 0,
          "tp1": 1, "fp1": 0, "fn1": 0, "tp2": 1, "fp2": 0, "fn2": 0}
    with metrics.aggregate() as agg:
        D2vClassificationCriterion.reduce_metrics([b1])
        D2vClassificationCriterion.reduce_metrics([b2])
    # summed: class 0 tp 2 -> F1 1; class 1 tp 1 fn 1 -> 2/3; class 2 tp 1 fp 1 -> 2/3
    assert agg.get_smoothed_values()["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3, abs=0.01)
    assert agg.get_smoothed_values()["top1"] == pytest.approx(80.0)


def test_bad_labels_are_named(commands, tmp_path):
    labels = (commands / "labels.txt").read_text().split()
    lines = (commands / "valid.label").read_text().splitlines()
    (tmp_path / "short.label").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(AudioDataError, match="short.label has 9 lines but .*valid.tsv lists 10 files"):
        ClassifiedAudioDataset(str(commands / "valid.tsv"), str(tmp_path / "short.label"), labels)
    (tmp_path / "odd.label").write_text("\n".join(["maybe"] + lines[1:]) + "\n")
    with pytest.raises(AudioDataError, match=r"odd.label, line 1: class 'maybe' is not in labels.txt"):
        ClassifiedAudioDataset(str(commands / "valid.tsv"), str(tmp_path / "odd.label"), labels)
    ds = ClassifiedAudioDataset(str(commands / "valid.tsv"), str(commands / "valid.label"), labels, shuffle=False)
    batch = ds.collater([ds[i] for i in range(4)])
    assert batch["target"].tolist() == [labels.index(w) for w in lines[:4]] and batch["net_input"]["source"].dim() == 2


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "weighted"])
def test_fine_tunes_validates_and_reloads(pretrained, commands, tmp_path, pooling):
    ckpt, _ = pretrained("v2")
    save = tmp_path / "ft"
    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/audio_classification"),
               "--config-name", "tiny", f"task.data={commands}", f"model.pretrained_path={ckpt}", f"model.pooling={pooling}",
               f"common.user_dir={user_dir()}", f"checkpoint.save_dir={save}", f"hydra.run.dir={tmp_path / 'h'}",
               "optimization.max_update=12", "dataset.validate_interval_updates=12", "checkpoint.save_interval_updates=12",
               "dataset.batch_size=8", "dataset.num_workers=0", "model.classifier_proj_size=16", "common.log_interval=4"])
    assert "valid on 'valid' subset" in log and "| top1 " in log and "| f1 " in log, log[-2000:]
    out = run([os.path.join(BIN, "fairseq-validate"), str(commands), "--user-dir", user_dir(), "--task",
               "d2v_audio_classification", "--path", str(save / "checkpoint_best.pt"), "--batch-size", "8",
               "--valid-subset", "valid"])
    assert "| top1 " in out and "| f1 " in out
    saved = torch.load(save / "checkpoint_best.pt", weights_only=False)
    assert saved["cfg"]["model"]["_name"] == "d2v_audio_classifier" and saved["cfg"]["model"]["pretrained_args"]
    assert ("layer_weights" in saved["model"]) == (pooling == "weighted")
