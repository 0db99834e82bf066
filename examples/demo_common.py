"""What the three demo stories share: running fairseq's binaries, pretraining once, and
fine-tuning the same architecture from the pretrained checkpoint and from scratch."""
import functools
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PY = sys.executable
BASELINE, PRETRAINED = "fine-tuned from random init", "fine-tuned from d2v pretraining"


def sh(cmd, log=None):
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log:
        with open(log, "w") as f:
            f.write(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}); last output:\n{proc.stdout[-4000:]}")
    return proc.stdout


@functools.lru_cache(maxsize=None)
def user_dir():
    return sh([PY, "-m", "d2v_plugin.userdir"]).strip().splitlines()[-1]


def hydra_train(config_dir, name, run_dir, log, *overrides):
    """fairseq-hydra-train with REPO/config_dir/name.yaml -> minutes taken."""
    start = time.time()
    sh([f"{BIN}/fairseq-hydra-train", "--config-dir", f"{REPO}/{config_dir}", "--config-name", name,
        f"hydra.run.dir={run_dir}", *overrides], log=log)
    return (time.time() - start) / 60


def losses(log):
    """[(update, train loss)] from a fairseq log."""
    text = open(log).read()
    return [(int(m.group(2)), float(m.group(1))) for m in re.finditer(r"train_inner\].*?loss=([\d.]+).*?num_updates=(\d+)", text)]


def pretrain(work, tag, config_dir, data, seed, updates, config="tiny_v2"):
    """A fresh pretraining run of config_dir/CONFIG.yaml -> (checkpoint_last.pt, minutes, loss curve)."""
    save = f"{work}/ckpt_{tag}_pretrain"
    shutil.rmtree(save, ignore_errors=True)  # a rerun trains afresh instead of resuming a finished run
    log = f"{work}/{tag}_pretrain.log"
    minutes = hydra_train(config_dir, config, f"{work}/hydra_{tag}_pretrain", log, f"task.data={data}",
                          f"common.user_dir={user_dir()}", f"checkpoint.save_dir={save}", f"common.seed={seed}",
                          f"optimization.max_update={updates}", f"model.ema_anneal_end_step={updates}")
    return f"{save}/checkpoint_last.pt", minutes, losses(log)


def finetune_runs(work, tag, config_dir, data, pretrained, seed, runs, evaluate, *overrides):
    """runs: {name: (random_init "true"|"false", updates, extra overrides)}; evaluate(checkpoint, log) -> dict.
    Each run fine-tunes config_dir/tiny.yaml and is scored on its best checkpoint."""
    results = {}
    for name, (random_init, updates, extra) in runs.items():
        run_tag = f"{tag}_" + re.sub(r"\W+", "_", name.split(" (")[0])
        save = f"{work}/ckpt_{run_tag}"
        shutil.rmtree(save, ignore_errors=True)
        minutes = hydra_train(config_dir, "tiny", f"{work}/hydra_{run_tag}", f"{work}/{run_tag}.log", f"task.data={data}",
                              f"model.pretrained_path={pretrained}", f"model.random_init={random_init}",
                              f"common.user_dir={user_dir()}", f"checkpoint.save_dir={save}", f"common.seed={seed}",
                              f"optimization.max_update={updates}", *overrides, *extra)
        results[name] = {"updates": updates, "minutes": round(minutes, 1), "checkpoint": f"{save}/checkpoint_best.pt",
                         **evaluate(f"{save}/checkpoint_best.pt", f"{work}/eval_{run_tag}.log")}
    return results


def compare(a, extra=None):
    """The usual pair: from scratch and from pretraining, same budget."""
    return {BASELINE: ("true", a.ft_updates, extra or []), PRETRAINED: ("false", a.ft_updates, extra or [])}


def curve_text(curve):
    return f"loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else "no loss logged"


def loss_fell(curve):
    return len(curve) >= 2 and curve[-1][1] < curve[0][1]


def fairseq_validate(data, task, ckpt, subset, batch_size, log):
    """fairseq-validate on one split -> {metric: value} of its summary line."""
    out = sh([f"{BIN}/fairseq-validate", data, "--user-dir", user_dir(), "--task", task, "--path", ckpt,
              "--valid-subset", subset, "--batch-size", str(batch_size), "--num-workers", "0"], log=log)
    line = [x for x in out.splitlines() if f"valid on '{subset}' subset" in x][-1]
    return {k: float(v) for k, v in re.findall(r"\| (\w+) (-?[\d.]+)", line)}
