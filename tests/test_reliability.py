"""Reliability: killed-and-resumed runs, atomic checkpoint files."""
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from d2v_plugin.checkpoints import atomic_copy

from .conftest import BIN, REPO, run, train_args


def logged_losses(log: str):
    """{update: the train_inner line's loss string} of a --log-interval 1 run."""
    return {int(u): loss for loss, u in re.findall(r"train_inner.*?loss=([\d.]+).*?num_updates=(\d+)", log)}


def test_killed_run_resumes_exactly(speech_corpus, tmp_path):
    """SIGKILL once the first checkpoint is written (checkpoints every 4 updates), restart
    from checkpoint_last.pt: the same losses and, at the end, the same student, teacher
    (fp32 ``_ema``) and optimizer state as a run that was never interrupted."""
    def cmd(save):
        return [os.path.join(BIN, "fairseq-train"), *train_args(speech_corpus / "manifest", "--clone-batch", "2"),
                "--max-update", "40", "--save-interval-updates", "4", "--no-epoch-checkpoints", "--disable-validation",
                "--save-dir", str(save), "--log-format", "simple", "--log-interval", "1", "--max-tokens", "50000"]

    whole = run(cmd(tmp_path / "whole"))
    proc = subprocess.Popen(cmd(tmp_path / "killed"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoint_last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run ended before writing a checkpoint"
    resumed = run(cmd(tmp_path / "killed"))
    loaded = re.search(r"Loaded checkpoint .*\(epoch \d+ @ (\d+) updates\)", resumed)
    assert loaded, resumed[-3000:]
    start = int(loaded.group(1))
    assert 4 <= start < 40, "the kill came too late to test a resume"
    before, after = logged_losses(whole), logged_losses(resumed)
    assert sorted(after) == list(range(start + 1, 41)) and all(after[u] == before[u] for u in after), (before, after)

    a = torch.load(tmp_path / "whole" / "checkpoint_last.pt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 40
    for key, value in a["model"].items():
        if key == "_ema":
            assert set(value) == set(b["model"]["_ema"])
            for k, t in value.items():
                assert t.dtype == torch.float32
                assert torch.allclose(t, b["model"]["_ema"][k], atol=1e-6, rtol=0), f"teacher {k} differs after resume"
        else:
            assert torch.allclose(value, b["model"][key], atol=1e-6, rtol=0), f"{key} differs after resume"
    for sa, sb in zip(a["last_optimizer_state"]["state"].values(), b["last_optimizer_state"]["state"].values()):
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], atol=1e-6, rtol=0)


def test_checkpoint_copies_are_atomic(tmp_path, monkeypatch):
    """fairseq copies the freshly written checkpoint to checkpoint_last.pt; a process killed
    during that copy must leave the previous, loadable file."""
    from fairseq.file_io import PathManager

    import d2v_plugin  # noqa: F401  (installs the atomic copy)

    assert PathManager.copy is atomic_copy
    src, dst = tmp_path / "checkpoint_1_8.pt", tmp_path / "checkpoint_last.pt"
    torch.save({"update": 4}, dst)
    torch.save({"update": 8, "pad": torch.zeros(10000)}, src)

    def dies_half_way(a, b):
        with open(a, "rb") as f, open(b, "wb") as g:
            g.write(f.read(1000))
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr("shutil.copyfile", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(src), str(dst), overwrite=True)
    assert torch.load(dst)["update"] == 4
    monkeypatch.undo()
    assert PathManager.copy(str(src), str(dst), overwrite=True) and torch.load(dst)["update"] == 8
    assert not PathManager.copy(str(src), str(dst))  # no overwrite without overwrite=True
