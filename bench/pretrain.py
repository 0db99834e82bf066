"""Pretraining step benchmark: seconds per update, audio seconds per second, peak memory.

    python bench/pretrain.py [--out data/bench/pretrain.json] [--reps 5]

Each (size, algorithm, clone_batch) runs in its own process (clean peak RSS): one full
update = forward (teacher + student), backward, Adam step, EMA step, on a batch of
B utterances of S seconds. Reports the median of --reps timed updates after warm-up;
"s / view" divides by B * clone_batch, the cost of one masked view of one sample.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    "tiny": dict(depth=4, embed_dim=128, num_heads=4, average_top_k_layers=3, audio_decoder_dim=64, audio_decoder_layers=2,
                 audio_decoder_groups=4, audio_conv_pos_width=32, audio_conv_pos_depth=2, audio_conv_pos_groups=4,
                 audio_conv_feature_layers="[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2"),
    "small": dict(depth=6, embed_dim=256, num_heads=4, average_top_k_layers=4, audio_decoder_dim=128, audio_decoder_layers=3,
                  audio_decoder_groups=8, audio_conv_pos_width=64, audio_conv_pos_depth=2, audio_conv_pos_groups=8,
                  audio_conv_feature_layers="[(256, 10, 5)] + [(256, 3, 2)] * 4 + [(256, 2, 2)] * 2"),
}
RUNS = [("v1", 1), ("v2", 1), ("v2", 8)]


def one(size: str, algorithm: str, clone: int, batch: int, seconds: float, reps: int) -> dict:
    import torch

    from d2v_plugin.models.config import D2vMultiConfig
    from d2v_plugin.models.d2v_multi import D2vMultiModel

    torch.manual_seed(0)
    kw = dict(SIZES[size], algorithm=algorithm, clone_batch=clone, layerdrop=0.0)
    if algorithm == "v1":
        kw.update(audio_mask_type="span", audio_mask_prob=0.65, audio_mask_length=10, audio_use_alibi=False)
    model = D2vMultiModel(D2vMultiConfig(**kw)).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    source = torch.randn(batch, int(seconds * 16000))
    times = []
    for i in range(reps + 2):
        start = time.perf_counter()
        out = model(source)
        (out["losses"]["regression"] / out["sample_size"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.ema_step(i + 1)
        if i >= 2:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("teacher."))
    return dict(size=size, algorithm=algorithm, clone_batch=clone, batch=batch, seconds_per_sample=seconds,
                params_m=round(n_params / 1e6, 2), sec_per_update=sec, sec_per_update_all=times,
                audio_sec_per_sec=batch * seconds / sec, sec_per_view=sec / (batch * clone),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, threads=torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/bench/pretrain.json", help="JSON output path")
    ap.add_argument("--reps", type=int, default=5, help="timed updates per run (median reported)")
    ap.add_argument("--batch", type=int, default=4, help="utterances per batch")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds of audio per utterance")
    ap.add_argument("--sizes", default="tiny,small", help="comma-separated sizes")
    ap.add_argument("--one", nargs=3, metavar=("SIZE", "ALGO", "CLONE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], int(a.one[2]), a.batch, a.seconds, a.reps)))
        return
    rows = []
    for size in a.sizes.split(","):
        for algorithm, clone in RUNS:
            cmd = [sys.executable, __file__, "--one", size, algorithm, str(clone), "--reps", str(a.reps),
                   "--batch", str(a.batch), "--seconds", str(a.seconds)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
    head = f"{'size':<6} {'algo':<4} {'M':>2} {'params':>7} {'s/update':>9} {'audio s/s':>10} {'s/view':>8} {'peak MiB':>9}"
    print(head)
    for r in rows:
        print(f"{r['size']:<6} {r['algorithm']:<4} {r['clone_batch']:>2} {r['params_m']:>6}M {r['sec_per_update']:>9.3f} "
              f"{r['audio_sec_per_sec']:>10.1f} {r['sec_per_view']:>8.4f} {r['peak_rss_mib']:>9.0f}")
    for size in a.sizes.split(","):
        by = {(r["algorithm"], r["clone_batch"]): r for r in rows if r["size"] == size}
        print(f"{size}: v2 M=8 vs M=1 cost per masked view: {by[('v2', 8)]['sec_per_view'] / by[('v2', 1)]['sec_per_view']:.2f}x; "
              f"v2 M=1 vs v1 seconds per update: {by[('v2', 1)]['sec_per_update'] / by[('v1', 1)]['sec_per_update']:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"device": "cpu", "batch": a.batch, "seconds": a.seconds, "reps": a.reps, "runs": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
