"""LM weight / word score sweep for `fairseq-generate --decoder kenlm`, on the validation split.

    python examples/lm_sweep.py --data ASR_DATA --path CKPT --lm LM_DIR/lm.arpa \\
        [--weights 0.5,1,2,4] [--word-scores -1,0,1] [--beam 50] [--subset valid]

Decodes the subset with every pair through `fairseq-generate --scoring d2v_wer`, picks the
lowest WER (ties: the lower CER) and writes it to LM_DIR/decoding.json, where
`fairseq-generate --decoder kenlm --decoder-lm LM_DIR/lm.arpa` reads it when
`--decoder-lm-weight` / `--word-score` are not given. Tune on validation, never on test.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_common import BIN, sh, user_dir  # noqa: E402


def generate(data, ckpt, subset, log, *decoder):
    """fairseq-generate -> {"wer", "cer", "decoder", "hyps": {id: text}, "refs": {id: text}}."""
    out = sh([f"{BIN}/fairseq-generate", data, "--user-dir", user_dir(), "--task", "d2v_asr_finetuning", "--path", ckpt,
              "--gen-subset", subset, "--scoring", "d2v_wer", "--post-process", "letter", "--batch-size", "16",
              "--num-workers", "0", *decoder], log=log)
    summary = re.search(r"^Generate \S+ with beam=\d+: WER: ([\d.]+), CER: ([\d.]+), decoder: (.*)$", out, re.M)
    if not summary:
        sys.exit(f"{log}: fairseq-generate printed no d2v_wer summary line")
    return {"wer": float(summary.group(1)), "cer": float(summary.group(2)), "decoder": summary.group(3),
            "refs": dict(re.findall(r"^T-(\d+)\t(.*)$", out, re.M)),
            "hyps": {i: t for i, _, t in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", out, re.M)}}


def sweep(data, ckpt, lm, weights, scores, beam, subset, logs):
    """-> the chosen {"lm_weight", "word_score", ...}, also written to decoding.json beside the LM."""
    os.makedirs(logs, exist_ok=True)
    grid = []
    for w in weights:
        for s in scores:
            r = generate(data, ckpt, subset, f"{logs}/sweep_w{w}_s{s}.log", "--decoder", "kenlm", "--decoder-lm", lm,
                         "--decoder-lm-weight", str(w), "--word-score", str(s), "--beam", str(beam))
            grid.append({"lm_weight": w, "word_score": s, "wer": r["wer"], "cer": r["cer"]})
            print(f"lm_weight {w:>5g} word_score {s:>5g}: {subset} WER {r['wer']:6.2f} CER {r['cer']:6.2f}", flush=True)
    best = min(grid, key=lambda g: (g["wer"], g["cer"]))
    chosen = {"lm_weight": best["lm_weight"], "word_score": best["word_score"], "beam": beam, "subset": subset,
              f"{subset}_wer": best["wer"], "checkpoint": os.path.abspath(ckpt), "grid": grid}
    with open(os.path.join(os.path.dirname(os.path.abspath(lm)), "decoding.json"), "w") as f:
        json.dump(chosen, f, indent=1)
    return chosen


def floats(text):
    return [float(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="ASR data folder (manifests, .ltr, dict.ltr.txt)")
    ap.add_argument("--path", required=True, help="fine-tuned d2v_ctc checkpoint")
    ap.add_argument("--lm", required=True, help="LM_DIR/lm.arpa from python -m d2v_plugin.prep.lm")
    ap.add_argument("--weights", default="0.5,1,2,4", help="LM weights to try")
    ap.add_argument("--word-scores", default="-1,0,1", help="word scores to try")
    ap.add_argument("--beam", type=int, default=50, help="beam size")
    ap.add_argument("--subset", default="valid", help="split to tune on")
    ap.add_argument("--logs", default="", help="folder of the fairseq-generate logs (default: beside the LM)")
    a = ap.parse_args()
    for path in (a.path, a.lm):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found")
    logs = a.logs or os.path.join(os.path.dirname(os.path.abspath(a.lm)), "sweep")
    c = sweep(a.data, a.path, a.lm, floats(a.weights), floats(a.word_scores), a.beam, a.subset, logs)
    print(f"chosen: lm_weight {c['lm_weight']:g}, word_score {c['word_score']:g} ({a.subset} WER {c[f'{a.subset}_wer']:.2f}); "
          f"written to {os.path.join(os.path.dirname(os.path.abspath(a.lm)), 'decoding.json')}")


if __name__ == "__main__":
    main()
