"""Channels-first vs channels-last speech feature extractor (the before/after of
``modules/positional.py: conv_channels_last``).

    python bench/conv_layout.py [--batch 4] [--seconds 3] [--runs 6]

"channels-first" is the textbook layout the extractor used before: Conv1d on (B, C, T),
then LayerNorm over channels on a transposed copy and back. "channels-last" is
d2v_plugin's ``ConvFeatureExtractor`` as shipped: (B, T, C) memory throughout. Same
weights, same outputs (checked), forward + backward of the base speech extractor (7
layers, 512 channels), interleaved runs, medians; prints a table and writes JSON.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from d2v_plugin.modules.feature_extractor import ConvFeatureExtractor, parse_conv_spec

SPEC = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2"


def channels_first(extractor: ConvFeatureExtractor, wav: torch.Tensor) -> torch.Tensor:
    """The former layout: (B, C, T) activations, transposed copies around each LayerNorm."""
    x = wav.unsqueeze(1)
    for layer in extractor.layers:
        x = layer.conv(x)
        n = layer.norm
        x = F.layer_norm(x.transpose(1, 2), n.normalized_shape, n.weight, n.bias, n.eps).transpose(1, 2)
        x = F.gelu(x)
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="utterances")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of 16 kHz audio each")
    ap.add_argument("--runs", type=int, default=6, help="timed forward + backward runs per layout")
    ap.add_argument("--out", default="data/bench/conv_layout.json", help="JSON output")
    a = ap.parse_args()
    torch.manual_seed(0)
    ext = ConvFeatureExtractor(parse_conv_spec(SPEC), "layer_norm")
    wav = torch.randn(a.batch, int(a.seconds * 16000))
    with torch.no_grad():
        diff = float((channels_first(ext, wav) - ext(wav)).abs().max())
    if diff > 1e-4:
        sys.exit(f"layouts disagree: max |difference| {diff}")
    layouts = {"channels-first": lambda: channels_first(ext, wav), "channels-last": lambda: ext(wav)}
    times = {k: [] for k in layouts}
    for i in range(a.runs + 1):
        for name, fn in layouts.items():
            start = time.perf_counter()
            fn().pow(2).mean().backward()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'layout':<15} {'s (fwd+bwd)':>12}  runs   (max |difference| of outputs {diff:.1e}, {torch.get_num_threads()} threads)")
    for k, v in times.items():
        print(f"{k:<15} {med[k]:>12.3f}  " + " ".join(f"{x:.2f}" for x in v))
    print(f"channels-last speedup: {med['channels-first'] / med['channels-last']:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"batch": a.batch, "seconds": a.seconds, "spec": SPEC, "max_abs_diff": diff, "runs": times, "median": med}, f,
                  indent=1)


if __name__ == "__main__":
    main()
