"""Fused vs explicit attention on this CPU, fp32 and bf16 (the before/after of
``modules/transformer.py: explicit_attention``).

    python bench/attention.py [--threads 2] [--runs 7] [--out JSON]

"fused" is ``F.scaled_dot_product_attention`` (PyTorch picks its CPU flash kernel);
"explicit" is d2v_plugin's ``explicit_attention``: two batched matrix products around a
softmax. Forward + backward, at the (batch x views, heads, tokens, head dim) shapes of the
data2vec 2.0 students and teachers of ``bench/vs_reference.py`` and the base models, with
and without a padding mask; interleaved runs, medians. Prints a table and writes JSON; the
outputs of the two are compared (max abs difference) on the same inputs.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from d2v_plugin.modules.transformer import explicit_attention

# (name, B, H, T, head dim): v2 students see the kept tokens of clone_batch views; v1 students, fine-tuning
# and the (fp32) teacher see every token
SHAPES = [("image student (16 x 8 views, 13 kept patches)", 128, 4, 13, 64),
          ("image full sequence (16 images, 65 tokens)", 16, 4, 65, 64),
          ("text student (8 x 8 views, 62 kept tokens)", 64, 4, 62, 64),
          ("text full sequence (8 blocks, 128 tokens)", 8, 4, 128, 64),
          ("speech student (4 x 8 views, 60 kept frames)", 32, 4, 60, 64),
          ("base text full sequence (4 x 512 tokens)", 4, 12, 512, 64)]


def time_one(fn, q, k, v, mask, runs: int) -> float:
    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, mask).float().sum().backward()
    step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--runs", type=int, default=7, help="timed forward+backward passes per variant (median)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median of the per-round medians)")
    ap.add_argument("--out", default="data/bench/attention.json", help="JSON output path")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    fused = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    explicit = lambda q, k, v, m: explicit_attention(q, k, v, m, 0.0)  # noqa: E731
    rows = []
    print(f"torch {torch.__version__}, {a.threads} threads; forward + backward, ms (median of {a.rounds} rounds "
          f"x {a.runs} runs, alternating)")
    print(f"{'shape':<48} {'dtype':<9} {'mask':<5} {'fused ms':>9} {'explicit ms':>12} {'speedup':>8} {'max diff':>9}")
    for name, B, H, T, d in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for masked in (False, True):
                q, k, v = (torch.randn(B, H, T, d).to(dtype).requires_grad_() for _ in range(3))
                mask = None
                if masked:  # the last quarter of every other row is padding
                    pad = torch.zeros(B, T, dtype=torch.bool)
                    pad[::2, T - T // 4:] = True
                    mask = (~pad)[:, None, None, :]
                diff = (fused(q, k, v, mask).float() - explicit(q, k, v, mask).float()).abs().max().item()
                per = {"fused": [], "explicit": []}
                for r in range(a.rounds):
                    for label in (("fused", "explicit") if r % 2 == 0 else ("explicit", "fused")):
                        per[label].append(time_one(fused if label == "fused" else explicit, q, k, v, mask, a.runs))
                ms = {k_: statistics.median(v_) * 1e3 for k_, v_ in per.items()}
                row = dict(shape=name, B=B, H=H, T=T, head_dim=d, dtype=str(dtype).split(".")[-1], mask=masked,
                           fused_ms=ms["fused"], explicit_ms=ms["explicit"], speedup=ms["fused"] / ms["explicit"],
                           max_abs_diff=diff)
                rows.append(row)
                print(f"{name:<48} {row['dtype']:<9} {str(masked):<5} {ms['fused']:>9.2f} {ms['explicit']:>12.2f} "
                      f"{row['speedup']:>7.2f}x {diff:>9.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": a.threads, "command": " ".join(sys.argv), "rows": rows}, f,
                  indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
