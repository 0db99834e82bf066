"""The main job of `make demo`: data2vec 2.0 speech pretraining on sample speech.

1. builds a sample corpus (espeak-ng reading WordNet sentences, 16 kHz) and manifests,
2. pretrains config/pretrain/audio/tiny_v2.yaml with `fairseq-hydra-train`,
3. reloads checkpoint_last.pt with fairseq's loader and checks the fp32 teacher,
4. prints the loss curve and what happened.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def sh(cmd, log=None):
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}); last output:\n{proc.stdout[-4000:]}")
    return proc.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="data/demo", help="working folder (corpus, checkpoints, logs)")
    ap.add_argument("--n", type=int, default=400, help="utterances in the sample corpus")
    ap.add_argument("--updates", type=int, default=200, help="pretraining updates")
    ap.add_argument("--config", default="tiny_v2", help="config/pretrain/audio/<name>.yaml")
    a = ap.parse_args()
    work = os.path.abspath(a.work)
    corpus, manifest, ckpt = f"{work}/speech", f"{work}/speech/manifest", f"{work}/ckpt_{a.config}"
    if not os.path.isfile(f"{corpus}/transcripts.tsv"):
        sh([sys.executable, "-m", "d2v_plugin.samples", "speech", "--out", corpus, "--n", str(a.n)])
    if not os.path.isfile(f"{manifest}/train.tsv"):
        sh([sys.executable, "-m", "d2v_plugin.prep.audio_manifest", f"{corpus}/wav", "--dest", manifest, "--valid-percent", "0.05"])
    user_dir = sh([sys.executable, "-m", "d2v_plugin.userdir"]).strip().splitlines()[-1]
    shutil.rmtree(ckpt, ignore_errors=True)  # a rerun trains afresh instead of resuming a finished run
    start = time.time()
    log = f"{work}/pretrain_{a.config}.log"
    sh([f"{BIN}/fairseq-hydra-train", "--config-dir", f"{REPO}/config/pretrain/audio", "--config-name", a.config,
        f"task.data={manifest}", f"common.user_dir={user_dir}", f"checkpoint.save_dir={ckpt}",
        f"hydra.run.dir={work}/hydra_{a.config}", f"optimization.max_update={a.updates}"], log=log)
    minutes = (time.time() - start) / 60
    text = open(log).read()
    train = [(int(m.group(2)), float(m.group(1))) for m in re.finditer(r"train_inner\].*?loss=([\d.]+).*?num_updates=(\d+)", text)]
    valid = [(int(m.group(2)), float(m.group(1))) for m in re.finditer(r"\[valid\].*?\| loss ([\d.]+) .*?num_updates (\d+)", text)]

    import torch
    from fairseq import checkpoint_utils

    import d2v_plugin  # noqa: F401  registers the d2v_* components

    path = f"{ckpt}/checkpoint_last.pt"
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([path])
    saved = torch.load(path, weights_only=True)["model"]["_ema"]
    teacher = models[0].teacher.state_dict()
    same = all(torch.equal(teacher[k], v) for k, v in saved.items()) and set(teacher) == set(saved)
    fp32 = all(v.dtype == torch.float32 for v in teacher.values())
    n_params = sum(p.numel() for n, p in models[0].named_parameters() if not n.startswith("teacher."))

    print(f"\nd2v_plugin demo: data2vec {cfg.model.algorithm} speech pretraining ({a.config}, {n_params/1e6:.2f} M parameters)")
    print(f"corpus: {corpus} ({sum(1 for _ in open(manifest + '/train.tsv')) - 1} train utterances)")
    print(f"trained {a.updates} updates in {minutes:.1f} min; full log: {log}")
    print(f"{'update':>8} {'train loss':>11}")
    for step, loss in train:
        print(f"{step:>8} {loss:>11.3f}")
    for step, loss in valid:
        print(f"valid loss at update {step}: {loss:.3f}")
    falling = len(train) >= 2 and train[-1][1] < train[0][1]
    print(f"loss fell: {falling} ({train[0][1]:.3f} -> {train[-1][1]:.3f})" if train else "no loss logged")
    print(f"reloaded {path} with fairseq.checkpoint_utils.load_model_ensemble_and_task: {type(models[0]).__name__}")
    print(f"teacher weights fp32: {fp32}; equal to the saved _ema ({len(saved)} tensors): {same}")
    if not (falling and same and fp32):
        sys.exit("demo check failed")


if __name__ == "__main__":
    main()
