"""Pretraining step benchmark for every modality: data2vec 1.0 and 2.0, several sizes and
``clone_batch`` values.

    python bench/pretrain.py [--modalities audio,image,text] [--sizes tiny,small,base]
                             [--clones 1,4,8,16] [--reps 5] [--device cpu|cuda]
                             [--precision fp32,bf16] [--out JSON]

The model settings are the shipped YAMLs' ``model:`` sections (``config/pretrain/<modality>/
{tiny,base}_{v1,v2}.yaml``; ``small`` = the tiny YAML at depth 6, width 256, the
reference side-by-side shape), with ``clone_batch`` overridden for v2 (data2vec 1.0 reads
one masked view). Each configuration runs in its own process, so peak memory (CPU: peak
RSS; GPU: peak allocated) belongs to it alone. One update = masks (what data workers do),
forward (teacher + student + decoder + loss), backward, Adam step, EMA step; the table
reports the median of ``--reps`` timed updates after two warm-up updates, and the median
time of each part of the step:

    data     mask drawing for the batch (BM masks; a data-loader worker's job in training)
    local    the student's local encoder (conv feature extractor / patch / token embedding)
    teacher  the EMA teacher's forward pass and target construction (once per sample)
    student  the shared blocks on the masked views (v2: kept tokens only)
    decoder  v2: the conv decoder (and the scatter into the full sequence); v1: the head
    loss     regression loss and diagnostics
    backward / optimizer / ema

"s/view" divides an update by B x clone_batch: the cost of one masked view of one sample.

``--precision``: ``fp32``; ``bf16`` / ``fp16`` as fairseq's ``--bf16`` / ``--fp16`` train
(the whole student cast, inputs cast, Adam on fp32 master copies that are cast back after
each step, the EMA teacher fp32 and averaging the masters); on a GPU also ``autocast``
(fp32 weights, bf16 autocast regions). Every row reports the step's achieved GFLOP/s
(FLOPs of one update counted by ``torch.utils.flop_counter``) next to this machine's own
matrix-product rate in the same precision (a 2048 x 2048 product, same threads, measured
by the benchmark itself), so the distance to the machine's limit is visible; on a GPU also
model FLOPs utilisation against the datasheet bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(depth=6, embed_dim=256, num_heads=4, average_top_k_layers=4)
# per (modality, size): batch and input shape on CPU (GPU runs multiply the batch by --gpu-batch-mult)
INPUTS = {
    ("audio", "tiny"): dict(batch=4, seconds=4.0), ("audio", "small"): dict(batch=4, seconds=4.0),
    ("audio", "base"): dict(batch=2, seconds=4.0),
    ("image", "tiny"): dict(batch=32), ("image", "small"): dict(batch=32), ("image", "base"): dict(batch=4),
    ("text", "tiny"): dict(batch=16, tokens=128), ("text", "small"): dict(batch=16, tokens=128),
    ("text", "base"): dict(batch=4, tokens=128),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
PARTS = ("data", "local", "teacher", "student", "decoder", "loss", "backward", "optimizer", "ema")


def model_config(modality: str, size: str, algorithm: str, clone: int, vocab: int = 8000):
    """The shipped YAML's model section as a D2vMultiConfig."""
    from omegaconf import OmegaConf

    from d2v_plugin.models.config import D2vMultiConfig

    name = "tiny" if size == "small" else size
    path = os.path.join(ROOT, "config", "pretrain", modality, f"{name}_{algorithm}.yaml")
    kw = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path).model).items() if k != "_name"}
    if size == "small":
        kw.update(SMALL)
    if algorithm == "v2" and clone is not None:
        kw["clone_batch"] = clone
    if modality == "text":
        kw.update(text_vocab_size=vocab, text_mask_index=vocab - 1)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(D2vMultiConfig), kw)), path


def make_batch(modality: str, size: str, cfg, mult: int, device):
    """Synthetic inputs of the benchmark shape: (source, padding_mask, units per sample)."""
    import torch

    shape = INPUTS[(modality, size)]
    B = shape["batch"] * mult
    if modality == "audio":
        n = int(shape["seconds"] * 16000)
        return torch.randn(B, n, device=device), None, shape["seconds"]
    if modality == "image":
        s = cfg.image_input_size
        return torch.randn(B, 3, s, s, device=device), None, 1
    L = shape["tokens"]
    tokens = torch.randint(4, cfg.text_vocab_size - 1, (B, L), device=device)
    tokens[:, 0], tokens[:, -1] = 0, 2  # <s> ... </s>
    return tokens, None, L


class PartTimer:
    """Wraps model methods so each call adds its wall time to a named part (synchronising
    the GPU around it when asked); nested parts are subtracted from their parent."""

    def __init__(self, sync):
        self.sync, self.acc, self.stack = sync, defaultdict(float), []

    @contextmanager
    def part(self, name):
        self.sync()
        start = time.perf_counter()
        self.stack.append(0.0)
        try:
            yield
        finally:
            self.sync()
            total = time.perf_counter() - start
            inner = self.stack.pop()
            self.acc[name] += total - inner
            if self.stack:
                self.stack[-1] += total

    def wrap(self, obj, method, name):
        fn = getattr(obj, method)

        def timed(*a, **k):
            with self.part(name):
                return fn(*a, **k)

        setattr(obj, method, timed)


DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


class MasterWeights:
    """fairseq's FP16Optimizer in miniature: the student's parameters cast to ``dtype``,
    Adam on fp32 masters, gradients copied up and weights copied down around each step."""

    def __init__(self, model, dtype, lr):
        import torch

        self.params = [p for p in model.parameters() if p.requires_grad]
        model.to(dtype)  # the teacher keeps fp32 (EMATeacher._apply)
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.Adam(self.masters, lr=lr)

    def step(self):
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        for p, m in zip(self.params, self.masters):
            p.data.copy_(m.data)
            p.grad = None

    def by_id(self):
        return {id(p): m.data for p, m in zip(self.params, self.masters)}


def matmul_gflops(dtype_name: str, device, n: int = 2048, reps: int = 5) -> float:
    """This machine's matrix-product rate in a dtype: the median of ``reps`` n x n products."""
    import torch

    dtype = getattr(torch, DTYPES.get(dtype_name, "float32"))
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    times = []
    for i in range(reps + 1):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        if i:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def one(modality, size, algorithm, clone, reps, device, mult, compile_blocks=False, precision="fp32") -> dict:
    import torch

    from d2v_plugin.models.d2v_multi import D2vMultiModel

    torch.manual_seed(0)
    cfg, path = model_config(modality, size, algorithm, clone)
    if compile_blocks:
        cfg.compile_blocks = True
    model = D2vMultiModel(cfg).to(device).train()
    enc = model.modality_encoders[modality]
    source, pad, units = make_batch(modality, size, cfg, mult, device)
    B = source.shape[0]
    M = cfg.clone_batch
    gpu = device != "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "autocast" else nullcontext
    if precision in DTYPES:
        masters = MasterWeights(model, getattr(torch, DTYPES[precision]), 1e-4)
        source = source.to(getattr(torch, DTYPES[precision])) if source.is_floating_point() else source
        opt_step, ema_masters = masters.step, masters.by_id
    else:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def opt_step():
            opt.step()
            opt.zero_grad(set_to_none=True)

        ema_masters = dict

    timer = PartTimer(sync)
    timer.wrap(enc, "local_features", "local")
    timer.wrap(model, "forward_teacher", "teacher")
    timer.wrap(model, "forward_student", "student")
    timer.wrap(model, "forward_loss", "loss")
    if enc.decoder is not None:
        timer.wrap(enc.decoder, "forward", "decoder")
        timer.wrap(model, "decoder_input", "decoder")
    if model.final_proj is not None:
        timer.wrap(model.final_proj, "forward", "decoder")
    with torch.no_grad():
        T = enc.local_features(source[:1], None)[0].shape[1]
    timer.acc.clear()

    def step(i):
        with timer.part("data"):
            mask = enc.masking(enc.frame_lengths(None, B, T), T).to(device, non_blocking=True)
        with autocast():
            out = model(source, pad, mask=mask, modality=modality)
        with timer.part("backward"):
            (out["losses"]["regression"] / out["sample_size"]).backward()
        with timer.part("optimizer"):
            opt_step()
        with timer.part("ema"):
            model.ema_step(i + 1, ema_masters())

    times, parts = [], defaultdict(list)
    for i in range(reps + 2):
        timer.acc.clear()
        if gpu and i == 2:
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
            for p in PARTS:
                parts[p].append(timer.acc.get(p, 0.0))
    sec = statistics.median(times)
    row = dict(modality=modality, size=size, algorithm=algorithm, clone_batch=M, batch=B, config=os.path.relpath(path, ROOT),
               depth=cfg.depth, embed_dim=cfg.embed_dim, frames=T,
               params_m=round(sum(p.numel() for n, p in model.named_parameters() if ".teacher." not in f".{n}") / 1e6, 2),
               sec_per_update=sec, sec_per_update_all=times, sec_per_view=sec / (B * M),
               throughput=B * units / sec, throughput_unit={"audio": "audio s/s", "image": "images/s", "text": "tokens/s"}[modality],
               parts={p: statistics.median(v) for p, v in parts.items()})
    row["ema_pct"] = 100 * row["parts"]["ema"] / sec
    row["compiled"] = model.compiled
    row["precision"] = precision
    if gpu:
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["threads"] = torch.get_num_threads()
    row.update(flops_and_rates(step, sec, device, "bf16" if precision == "autocast" else precision))
    return row


def flops_and_rates(step, sec, device, precision) -> dict:
    """FLOPs of one update, the achieved GFLOP/s, the machine's matmul GFLOP/s in the same
    precision, and on a GPU the model FLOPs utilisation against the datasheet bf16 peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(10**6)
    flops = counter.get_total_flops()
    out = dict(gflop_per_update=flops / 1e9, achieved_gflops=flops / sec / 1e9, matmul_gflops=matmul_gflops(precision, device))
    out["pct_of_matmul"] = 100 * out["achieved_gflops"] / out["matmul_gflops"]
    if device != "cpu":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        out.update(gpu=name, mfu_pct=None if peak is None else 100 * flops / sec / (peak * 1e12))
    return out


def cpu_name() -> str:
    return next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                platform.processor())


def device_name(device: str) -> str:
    if device != "cpu":
        import torch

        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {os.cpu_count()} cores"


def print_table(rows):
    gpu = any("mfu_pct" in r for r in rows)
    head = (f"{'modality':<8} {'size':<5} {'alg':<3} {'prec':<5} {'M':>2} {'B':>3} {'params':>7} {'s/update':>9} "
            f"{'throughput':>17} {'s/view':>8} {'peak MiB':>8} {'GFLOP/s':>8} {'matmul':>7} {'%mm':>5} "
            + " ".join(f"{p[:7]:>7}" for p in PARTS) + (" MFU%" if gpu else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        parts = " ".join(f"{100 * r['parts'][p] / r['sec_per_update']:>6.1f}%" for p in PARTS)
        tp = f"{r['throughput']:.1f} {r['throughput_unit'].split()[0]}"
        print(f"{r['modality']:<8} {r['size']:<5} {r['algorithm']:<3} {r.get('precision', 'fp32'):<5} {r['clone_batch']:>2} "
              f"{r['batch']:>3} {r['params_m']:>6}M {r['sec_per_update']:>9.3f} {tp:>17} {r['sec_per_view']:>8.4f} "
              f"{r['peak_mem_mib']:>8.0f} {r['achieved_gflops']:>8.1f} {r['matmul_gflops']:>7.0f} {r['pct_of_matmul']:>5.1f} {parts}"
              + (f" {r['mfu_pct']:.1f}" if gpu and r.get("mfu_pct") is not None else ""))


def summary(rows):
    out = []
    for (mod, size) in sorted({(r["modality"], r["size"]) for r in rows}):
        by = {(r["algorithm"], r["clone_batch"]): r for r in rows if (r["modality"], r["size"]) == (mod, size)}
        v2 = sorted(c for a, c in by if a == "v2")
        if ("v2", 1) in by:
            for c in v2[1:]:
                out.append(f"{mod} {size}: v2 cost per masked view at clone_batch {c} = "
                           f"{by[('v2', c)]['sec_per_view'] / by[('v2', 1)]['sec_per_view']:.2f}x clone_batch 1")
        for c in v2:
            out.append(f"{mod} {size}: EMA = {by[('v2', c)]['ema_pct']:.1f}% of a v2 step (clone_batch {c})")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/bench/pretrain.json", help="JSON output path")
    ap.add_argument("--reps", type=int, default=5, help="timed updates per configuration (median reported)")
    ap.add_argument("--modalities", default="audio,image,text", help="comma-separated modalities")
    ap.add_argument("--sizes", default="tiny,small,base", help="comma-separated sizes: tiny, small, base")
    ap.add_argument("--algorithms", default="v1,v2", help="comma-separated: v1, v2")
    ap.add_argument("--clones", default="1,4,8,16", help="v2 clone_batch values (masked views per sample)")
    ap.add_argument("--base-clones", default="1,8", help="v2 clone_batch values at base size (slow on a CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--gpu-batch-mult", type=int, default=8, help="batch multiplier on a GPU")
    ap.add_argument("--compile", action="store_true", help="run the blocks through torch.compile (model.compile_blocks)")
    ap.add_argument("--precision", default="fp32",
                    help="comma-separated: fp32, bf16, fp16 (fairseq's --bf16/--fp16: cast student, fp32 masters), "
                         "autocast (GPU: bf16 autocast over fp32 weights)")
    ap.add_argument("--one", nargs=5, metavar=("MOD", "SIZE", "ALGO", "CLONE", "PREC"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    mult = a.gpu_batch_mult if a.device != "cpu" else 1
    if a.one:
        mod, size, algo, clone, prec = a.one
        print(json.dumps(one(mod, size, algo, int(clone), a.reps, a.device, mult, a.compile, prec)))
        return
    bad = [p for p in a.precision.split(",") if p not in ("fp32", "bf16", "fp16", "autocast")]
    if bad or (a.device == "cpu" and {"fp16", "autocast"} & set(a.precision.split(","))):
        sys.exit(f"--precision {a.precision}: choose from fp32, bf16 (CPU and GPU), fp16, autocast (GPU)")
    rows = []
    for mod in a.modalities.split(","):
        for size in a.sizes.split(","):
            for algo in a.algorithms.split(","):
                clones = [1] if algo == "v1" else [int(c) for c in (a.base_clones if size == "base" else a.clones).split(",")]
                for clone in clones:
                    for prec in a.precision.split(","):  # precisions side by side, one process each
                        cmd = [sys.executable, os.path.abspath(__file__), "--one", mod, size, algo, str(clone), prec,
                               "--reps", str(a.reps), "--device", a.device, "--gpu-batch-mult", str(a.gpu_batch_mult)]
                        res = subprocess.run(cmd + (["--compile"] if a.compile else []), capture_output=True, text=True,
                                             cwd=ROOT)
                        if res.returncode:
                            sys.exit(f"{mod} {size} {algo} clone_batch {clone} {prec} failed:\n{res.stderr[-3000:]}")
                        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                        print(f"  {mod} {size} {algo} M={clone} {prec}: {rows[-1]['sec_per_update']:.3f} s/update",
                              file=sys.stderr)
    print(f"device: {device_name(a.device)}; medians of {a.reps} updates; parts in % of an update")
    print_table(rows)
    lines = summary(rows)
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"device": device_name(a.device), "reps": a.reps, "command": " ".join(sys.argv), "runs": rows,
                   "summary": lines}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
