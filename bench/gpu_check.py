"""One mixed-precision training run of bench/gpu_check.sh, checked: the run ended, its logged
losses are finite and fall, and its checkpoint's teacher is fp32 and finite.

    python bench/gpu_check.py LOG CHECKPOINT NAME [--rc EXIT_STATUS]

Prints one line (``ok`` or what failed); exit status 1 when a check fails. Also usable on
CPU runs (``common.bf16=true common.cpu=true``).
"""
import argparse
import math
import re
import sys

import torch


def check(log: str, ckpt: str, rc: int) -> tuple:
    problems = []
    if rc:
        problems.append(f"fairseq-hydra-train exited with {rc}")
    text = open(log, errors="replace").read()
    # fairseq's simple (loss=1.23,) and json ("loss": "1.23") log formats
    losses = [float(x) for x in re.findall(r'train_inner.*?(?:"loss": "|[ |]loss=)([^",\s]+)', text)]
    if len(losses) < 2:
        problems.append(f"{len(losses)} logged losses (need 2)")
    elif not all(math.isfinite(x) for x in losses):
        problems.append(f"non-finite loss: {losses}")
    elif not losses[-1] < losses[0]:
        problems.append(f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
    try:
        import d2v_plugin  # noqa: F401  (allow-lists fairseq's pickled classes)

        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        ema = next((v for k, v in state["model"].items() if k.split(".")[-1] == "_ema"), None)
        if not ema:
            problems.append(f"{ckpt}: no _ema (teacher) entry")
        else:
            dtypes = sorted({str(t.dtype) for t in ema.values() if t.is_floating_point()})
            if dtypes != ["torch.float32"]:
                problems.append(f"teacher dtypes {dtypes}, expected torch.float32 only")
            if not all(torch.isfinite(t).all() for t in ema.values() if t.is_floating_point()):
                problems.append("the teacher has non-finite weights")
    except (OSError, RuntimeError, KeyError) as e:
        problems.append(f"{ckpt}: {e}")
    return problems, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("checkpoint")
    ap.add_argument("name")
    ap.add_argument("--rc", type=int, default=0, help="the run's exit status")
    a = ap.parse_args()
    problems, losses = check(a.log, a.checkpoint, a.rc)
    curve = " -> ".join(f"{x:.3f}" for x in losses[:1] + losses[-1:])
    if problems:
        print(f"{a.name}: FAILED: {'; '.join(problems)} (log {a.log})")
        sys.exit(1)
    print(f"{a.name}: ok (loss {curve} over {len(losses)} logged intervals; teacher fp32)")


if __name__ == "__main__":
    main()
