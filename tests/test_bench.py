"""The benchmark scripts' own pieces, and the optional torch.compile path of the model."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from .conftest import REPO, tiny_cfg

sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_check  # noqa: E402
import plot  # noqa: E402
import pretrain as bench_pretrain  # noqa: E402
import time_to_quality  # noqa: E402

from d2v_plugin.models.d2v_multi import D2vMultiModel  # noqa: E402
from d2v_plugin.probe import best_layer_probe, linear_probe  # noqa: E402


def test_part_timer_subtracts_nested_parts():
    timer = bench_pretrain.PartTimer(lambda: None)
    with timer.part("student"):
        time.sleep(0.05)
        with timer.part("decoder"):
            time.sleep(0.1)
    assert 0.04 < timer.acc["student"] < 0.09  # the decoder's 0.1 s is not counted twice
    assert 0.09 < timer.acc["decoder"] < 0.15


def test_bench_configs_are_the_shipped_yamls():
    cfg, path = bench_pretrain.model_config("image", "tiny", "v2", 8)
    assert path.endswith("config/pretrain/image/tiny_v2.yaml")
    assert (cfg.depth, cfg.embed_dim, cfg.clone_batch, cfg.norm_eps) == (4, 128, 8, 1e-6)  # 1e-6 parsed as a float
    small, _ = bench_pretrain.model_config("audio", "small", "v1", 8)
    assert (small.depth, small.embed_dim, small.clone_batch, small.algorithm) == (6, 256, 1, "v1")


def test_gpu_check_flags_a_low_precision_teacher_a_rising_loss_and_a_crash(tmp_path):
    """bench/gpu_check.py passes a good run and names each fault of a bad one."""
    def run(losses, ema_dtype, rc=0):
        log = tmp_path / "train.log"
        log.write_text("".join(f"[x][train_inner][INFO] - epoch 001: loss={v}, num_updates={10 * i}\n"
                               for i, v in enumerate(losses, 1)))
        ckpt = tmp_path / "checkpoint_last.pt"
        torch.save({"model": {"encoder.w": torch.zeros(2).bfloat16(),
                              "_ema": {"w": torch.ones(2, dtype=ema_dtype)}}}, ckpt)
        return gpu_check.check(str(log), str(ckpt), rc)[0]

    assert run([5.0, 4.0, 3.5], torch.float32) == []
    assert any("teacher dtypes" in p for p in run([5.0, 4.0], torch.bfloat16))
    assert any("did not fall" in p for p in run([4.0, 4.5], torch.float32))
    assert any("non-finite loss" in p for p in run([4.0, float("nan")], torch.float32))
    assert any("exited with 1" in p for p in run([5.0, 4.0], torch.float32, rc=1))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_one_configuration_reports_every_part(precision):
    out = subprocess.run([sys.executable, "bench/pretrain.py", "--one", "image", "tiny", "v2", "2", precision,
                          "--reps", "1"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["precision"] == precision and row["achieved_gflops"] > 0 and row["matmul_gflops"] > 0
    assert row["clone_batch"] == 2 and row["batch"] == 32 and row["frames"] == 64
    assert set(row["parts"]) == set(bench_pretrain.PARTS)
    assert all(v >= 0 for v in row["parts"].values()) and row["parts"]["teacher"] > 0 and row["parts"]["decoder"] > 0
    assert sum(row["parts"].values()) <= row["sec_per_update"] * 1.05
    assert row["sec_per_view"] == pytest.approx(row["sec_per_update"] / 64)


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 8, generator=g)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) > 97
    shuffled = y[torch.randperm(300, generator=g)]  # labels unrelated to the features: chance level
    assert linear_probe(x[:200], shuffled[:200], x[200:], shuffled[200:]) < 60


FAIRSEQ_LOG = """\
2026-12-04 04:01:20 | INFO | train_inner | epoch 001:  25 / 1588 loss=12.909, ppl=7692.91, num_updates=25, train_wall=43, wall=47
2026-12-04 04:02:10 | INFO | fairseq.checkpoint_utils | Saved checkpoint c/checkpoint_1_25.pt (...) (writing took 2.5 seconds)
[2026-12-04 04:02:47,1][train_inner][INFO] - epoch 001:  50 / 1588 loss=11.273, num_updates=50, train_wall=37, wall=96
2026-12-04 04:02:48 | INFO | fairseq.checkpoint_utils | Saved checkpoint c/checkpoint_1_50.pt (...) (writing took 0.5 seconds)
2026-12-04 04:03:23 | INFO | train_inner | epoch 001:  75 / 1588 loss=nan, ppl=nan, num_updates=75, train_wall=36, wall=130
"""


def test_best_layer_probe_picks_the_layer_by_validation_only():
    g = torch.Generator().manual_seed(0)
    y = {s: torch.randint(0, 2, (n,), generator=g) for s, n in (("train", 200), ("valid", 100), ("test", 100))}
    noise = {s: torch.randn(len(y[s]), 3, 4, generator=g) for s in y}
    feats = {s: noise[s].clone() for s in y}
    for s in y:  # layer 2 carries the label; layers 1 and 3 are noise
        feats[s][:, 1, 0] += 6 * y[s]
    r = best_layer_probe(feats, y, names=["a", "b", "c"])
    assert r["layer"] == "b" and r["valid"] > 95 and r["test"] > 95
    feats["test"][:, 1] = noise["test"][:, 1]  # the test split alone cannot change the choice
    assert best_layer_probe(feats, y)["layer"] == 2


def test_time_to_quality_clock_stops_while_checkpoints_are_written(tmp_path):
    log = tmp_path / "log"
    log.write_text(FAIRSEQ_LOG)  # fairseq's simple format and Hydra's, with checkpoint writes between
    clock, losses = time_to_quality.wall_clock(str(log))
    assert clock == {25: 47.0, 50: 93.5, 75: 127.0}  # wall minus the writing before each line, not train_wall
    assert losses[:2] == [(25, 12.909), (50, 11.273)] and losses[2][0] == 75 and losses[2][1] != losses[2][1]  # nan kept


def test_time_to_quality_snapshots_fall_on_logged_updates():
    # the default-budget text run: 240 s x 2.31 updates/s over 6 snapshots = 92.4 updates each; a
    # log interval of 18 logs 90 and 108 but not the snapshot at 93 (KeyError in the first real run)
    save_every, log_interval, updates = time_to_quality.plan(240, 2.31, 6)
    assert (save_every, log_interval, updates) == (95, 19, 570) and save_every % log_interval == 0
    assert time_to_quality.plan(10, 1.0, 6) == (2, 1, 12)  # fewer than 5 updates per snapshot: log each update
    for seconds, ups in [(60, 0.7), (240, 3.3), (1000, 11.0)]:
        every, interval, total = time_to_quality.plan(seconds, ups, 6)
        assert every % interval == 0 and total == 6 * every and total >= seconds * ups
    clock = {90: 45.0, 108: 54.0}  # a snapshot between logged updates: linear between them
    assert time_to_quality.clock_at(clock, 93) == 46.5 and time_to_quality.clock_at(clock, 108) == 54.0
    with pytest.raises(ValueError, match="outside the logged updates"):
        time_to_quality.clock_at(clock, 120)


def test_time_to_quality_speedup_interpolates_between_snapshots():
    v2 = [(50.0, 60.0), (100.0, 70.0), (150.0, 75.0)]
    baseline = [(50.0, 55.0), (100.0, 62.0), (150.0, 65.0)]  # final 65 is reached by v2 at 50 + 50 * 5 / 10 = 75 s
    s = time_to_quality.speedups({"d2v_v2": v2, "roberta": baseline}, "text", higher_is_better=True)["roberta"]
    assert s["d2v_v2_seconds"] == 75.0 and s["baseline_seconds"] == 150.0 and s["speedup"] == 2.0
    assert s["paper_speedup"] == 2.0
    assert time_to_quality.reach_time(v2, 50.0, True) == 50.0  # already there at the first snapshot
    assert time_to_quality.speedups({"d2v_v2": v2, "roberta": [(50.0, 80.0)]}, "text", True)["roberta"]["speedup"] is None
    cer = [(50.0, 40.0), (100.0, 20.0)]  # lower is better: 30 is reached halfway
    assert time_to_quality.reach_time(cer, 30.0, higher_is_better=False) == 75.0
    assert time_to_quality.ranking({"a": 57.5, "b": 60.0, "c": 57.5}, True) == "b > a = c"
    assert time_to_quality.ranking({"a": 30.0, "b": 20.0}, False) == "b > a"


def test_line_chart_writes_a_png(tmp_path):
    from PIL import Image

    path = str(tmp_path / "c.png")
    plot.line_chart({"a": [(0, 50.0), (10, 60.0)], "b": [(0, 50.0), (5, 70.0)]}, path, "t", "x", "y", hline=(60.0, "h"))
    img = Image.open(path)
    assert img.size == (900, 560) and len(set(img.getdata())) > 3


def audio_mask(model, src):
    enc = model.modality_encoders["audio"]
    T = enc.local_features(src, None)[0].shape[1]
    return enc.masking(torch.full((src.shape[0],), T), T)


def test_compile_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def broken(fn, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    eager = D2vMultiModel(tiny_cfg())
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        model = D2vMultiModel(tiny_cfg(compile_blocks=True))
    assert not model.compiled and "running the blocks eagerly" in caplog.text
    assert all(b._compiled_call_impl is None for b in model.shared_blocks())
    src = torch.randn(2, 4000)
    mask = audio_mask(model, src)
    torch.manual_seed(1)
    a = eager(src, mask=mask)["losses"]["regression"]
    torch.manual_seed(1)
    b = model(src, mask=mask)["losses"]["regression"]
    assert torch.equal(a, b)


def test_compile_failure_at_run_time_falls_back(monkeypatch, caplog):
    torch.manual_seed(0)
    model = D2vMultiModel(tiny_cfg())
    model.compiled = True  # as if compiled, with a block whose compiled call breaks on a new shape
    calls = []

    def breaks_once(*a, **k):
        calls.append(1)
        raise RuntimeError("unsupported graph")

    model.blocks[0]._compiled_call_impl = breaks_once
    src = torch.randn(2, 4000)
    mask = audio_mask(model, src)
    with caplog.at_level(logging.WARNING):
        out = model(src, mask=mask)
    assert calls and torch.isfinite(out["losses"]["regression"]) and not model.compiled
    assert "running them eagerly from now on" in caplog.text


@pytest.mark.compile
def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    model = D2vMultiModel(tiny_cfg(compile_blocks=True))
    assert model.compiled
    src = torch.randn(2, 4000)
    mask = audio_mask(model, src)
    torch.manual_seed(1)  # the same decoder-input noise for both
    compiled = model(src, mask=mask)["losses"]["regression"]
    model.uncompile_blocks()
    torch.manual_seed(1)
    eager = model(src, mask=mask)["losses"]["regression"]
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5)
