"""The main job of `make demo`: the whole speech story on sample speech, with fairseq's binaries.

1. builds a sample corpus (espeak-ng voices reading WordNet sentences, 16 kHz); the test
   split holds out whole voices, and every utterance reads its own sentence, so test
   voices and sentences are unseen in training;
2. pretrains config/pretrain/audio/tiny_v2.yaml (data2vec 2.0) with `fairseq-hydra-train`
   on the unlabelled training audio, and reloads the checkpoint (fp32 teacher check);
3. fine-tunes config/finetune/asr/tiny.yaml with CTC on a labelled subset twice, from
   the pretrained checkpoint and from random initialisation (same budget);
4. decodes the held-out test split with `fairseq-generate --scoring d2v_wer` and prints
   CER/WER for the untrained, from-scratch and pretrained models: best path, beam search
   without LM, and beam search with a 4-gram word LM (`prep.lm`, built from the WordNet
   sentences that no valid or test utterance reads; weights swept on valid);
5. audio classification with the same pretrained checkpoint: spoken command words
   (`d2v_plugin.samples commands`, valid and test voices held out), fine-tuned with
   config/finetune/audio_classification/tiny.yaml from the pretrained checkpoint and from
   random initialisation, scored on the test voices with `fairseq-validate` (accuracy, macro F1).
"""
import argparse
import json
import os
import random
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_common import BASELINE, PRETRAINED, PY, compare, curve_text, fairseq_validate, finetune_runs, loss_fell, pretrain, sh  # noqa: E402
from lm_sweep import generate, sweep  # noqa: E402


def make_data(work, n, test_voices, labelled, seed):
    """-> (unlabelled manifest dir, labelled ASR dir)."""
    corpus, manifest, asr = f"{work}/speech", f"{work}/speech/manifest", f"{work}/asr"
    if not os.path.isfile(f"{corpus}/transcripts.tsv"):
        sh([PY, "-m", "d2v_plugin.samples", "speech", "--out", corpus, "--n", str(n)])
    with open(f"{corpus}/speakers.tsv") as f:
        held = [line for line in f if line.split("\t")[1] in test_voices]
    with open(f"{corpus}/test_voices.tsv", "w") as f:
        f.writelines(held)
    shutil.rmtree(manifest, ignore_errors=True)
    sh([PY, "-m", "d2v_plugin.prep.audio_manifest", f"{corpus}/wav", "--dest", manifest, "--valid-percent", "0.05",
        "--test-list", f"{corpus}/test_voices.tsv"])
    shutil.rmtree(asr, ignore_errors=True)
    os.makedirs(asr)
    for split in ("valid", "test"):
        shutil.copy(f"{manifest}/{split}.tsv", f"{asr}/{split}.tsv")
    with open(f"{manifest}/train.tsv") as f:
        root, *lines = f.read().splitlines()
    subset = sorted(random.Random(seed).sample(lines, min(labelled, len(lines))))
    with open(f"{asr}/train.tsv", "w") as f:
        f.write("\n".join([root, *subset]) + "\n")
    sh([PY, "-m", "d2v_plugin.prep.asr_labels", f"{corpus}/transcripts.tsv", "--manifest-dir", asr])
    return manifest, asr


def check_pretrained(path):
    """Reload with fairseq's loader: the teacher is fp32 and equals the saved _ema."""
    import torch
    from fairseq import checkpoint_utils

    import d2v_plugin  # noqa: F401  registers the d2v_* components

    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([path])
    saved = torch.load(path, weights_only=True)["model"]["_ema"]
    teacher = models[0].teacher.state_dict()
    same = set(teacher) == set(saved) and all(torch.equal(teacher[k], v) for k, v in saved.items())
    fp32 = all(v.dtype == torch.float32 for v in teacher.values())
    n_params = sum(p.numel() for n, p in models[0].named_parameters() if not n.startswith("teacher."))
    return cfg, same, fp32, n_params


def decode(asr, ckpt, log, *decoder):
    """fairseq-generate on the test split -> (CER %, WER %, utterances, first reference, its hypothesis)."""
    r = generate(asr, ckpt, "test", log, *decoder)
    first = min(r["refs"], key=int)
    return r["cer"], r["wer"], len(r["refs"]), r["refs"][first], r["hyps"].get(first, "")


def build_lm(work, asr, order):
    """A word n-gram LM of the WordNet sentences that no valid or test utterance reads."""
    from d2v_plugin.samples import wordnet_sentences

    text = f"{work}/speech/lm_text.txt"
    with open(text, "w") as f:
        f.write("\n".join(wordnet_sentences()) + "\n")
    sh([PY, "-m", "d2v_plugin.prep.lm", text, "--order", str(order), "--out", f"{work}/lm", "--dict",
        f"{asr}/dict.ltr.txt", "--exclude", f"{asr}/valid.wrd", f"{asr}/test.wrd"])
    return f"{work}/lm/lm.arpa"


def command_words(work, pretrained, seed, reps, updates):
    """Fine-tune the pretrained checkpoint and a random init on spoken command words -> results."""
    data = f"{work}/commands"
    shutil.rmtree(data, ignore_errors=True)
    sh([PY, "-m", "d2v_plugin.samples", "commands", "--out", data, "--reps", str(reps)])

    def evaluate(ckpt, log):
        m = fairseq_validate(data, "d2v_audio_classification", ckpt, "test", 16, log)
        return {"test_acc": m["top1"], "test_f1": m["f1"]}

    runs = {BASELINE: ("true", updates, []), PRETRAINED: ("false", updates, [])}
    return finetune_runs(work, "commands", "config/finetune/audio_classification", data, pretrained, seed, runs, evaluate)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="data/demo", help="working folder (corpus, checkpoints, logs)")
    ap.add_argument("--n", type=int, default=600, help="utterances in the sample corpus")
    ap.add_argument("--test-voices", default="en-gb-scotland,en-us+m3", help="espeak-ng voices held out for test")
    ap.add_argument("--labelled", type=int, default=300, help="labelled training utterances for fine-tuning")
    ap.add_argument("--updates", type=int, default=400, help="pretraining updates")
    ap.add_argument("--ft-updates", type=int, default=2000, help="fine-tuning updates (each run)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the labelled subset and of training")
    ap.add_argument("--lm-order", type=int, default=4, help="order of the word n-gram LM")
    ap.add_argument("--beam", type=int, default=50, help="beam size of the beam-search decoders")
    ap.add_argument("--command-reps", type=int, default=2, help="command words: utterances of each word per voice")
    ap.add_argument("--cls-updates", type=int, default=300, help="command words: fine-tuning updates (each run)")
    a = ap.parse_args()
    work = os.path.abspath(a.work)
    manifest, asr = make_data(work, a.n, a.test_voices.split(","), a.labelled, a.seed)
    n_train = sum(1 for _ in open(f"{manifest}/train.tsv")) - 1
    n_lab = sum(1 for _ in open(f"{asr}/train.tsv")) - 1
    n_test = sum(1 for _ in open(f"{asr}/test.tsv")) - 1

    pretrained, pt_min, curve = pretrain(work, "speech", "config/pretrain/audio", manifest, a.seed, a.updates)
    cfg, same, fp32, n_params = check_pretrained(pretrained)

    def evaluate(ckpt, log):
        cer, wer, n, ref, hyp = decode(asr, ckpt, log)
        return {"test_cer": round(cer, 2), "test_wer": wer, "example_ref": ref, "example_hyp": hyp, "utterances": n}

    runs = {"untrained (random init, no training)": ("true", 10, ["optimization.lr=[0.0]"]),  # lr 0: weights never change
            **compare(a)}
    results = finetune_runs(work, "speech", "config/finetune/asr", asr, pretrained, a.seed, runs, evaluate)

    # the same checkpoints decoded by beam search, without and with the word LM (weights swept on valid)
    lm = build_lm(work, asr, a.lm_order)
    tuned = sweep(asr, results[PRETRAINED]["checkpoint"], lm, [0.5, 1, 2, 4], [-1, 0, 1], a.beam, "valid", f"{work}/lm/sweep")
    for name in (BASELINE, PRETRAINED):
        r, tag = results[name], re.sub(r"\W+", "_", name)
        r["beam_cer"], r["beam_wer"], *_ = decode(asr, r["checkpoint"], f"{work}/eval_{tag}_beam.log", "--decoder", "beam",
                                                  "--beam", str(a.beam))
        r["lm_cer"], r["lm_wer"], *_ = decode(asr, r["checkpoint"], f"{work}/eval_{tag}_lm.log", "--decoder", "kenlm",
                                              "--decoder-lm", lm, "--beam", str(a.beam))

    print(f"\nd2v_plugin demo: data2vec {cfg.model.algorithm} speech pretraining + CTC fine-tuning "
          f"({n_params / 1e6:.2f} M parameters)")
    print(f"corpus: {work}/speech; pretraining on {n_train} unlabelled utterances, fine-tuning on {n_lab} labelled, "
          f"test: {n_test} utterances of held-out voices ({a.test_voices}) and unseen sentences")
    print(f"pretraining: {a.updates} updates in {pt_min:.1f} min, {curve_text(curve)}; "
          f"reloaded teacher fp32: {fp32}, equal to the saved _ema: {same}")
    print(f"{a.lm_order}-gram word LM of WordNet sentences without the valid/test ones: {lm}; "
          f"lm_weight {tuned['lm_weight']:g}, word_score {tuned['word_score']:g} chosen on valid (beam {a.beam})")
    print(f"\n{'model':<40} {'updates':>7} {'min':>5} {'CER %':>7} {'WER % best path':>15} {'beam, no LM':>11} "
          f"{'beam + LM':>9}")
    for name, r in results.items():
        beam, lm_wer = (f"{r[k]:.2f}" if k in r else "-" for k in ("beam_wer", "lm_wer"))
        print(f"{name:<40} {r['updates']:>7} {r['minutes']:>5} {r['test_cer']:>7.2f} {r['test_wer']:>15.2f} "
              f"{beam:>11} {lm_wer:>9}")
    best = results[PRETRAINED]
    print(f"\nexample (test): REF {best['example_ref']!r}\n                HYP {best['example_hyp']!r}")

    commands = command_words(work, pretrained, a.seed, a.command_reps, a.cls_updates)
    print(f"\naudio classification: 10 spoken command words, {a.command_reps} utterances per word and voice; "
          f"test: a held-out voice (en-us+m3)")
    print(f"{'model':<40} {'updates':>7} {'min':>5} {'test acc %':>10} {'macro F1 %':>10}")
    for name, r in commands.items():
        print(f"{name:<40} {r['updates']:>7} {r['minutes']:>5} {r['test_acc']:>10.2f} {r['test_f1']:>10.2f}")
    with open(f"{work}/results.json", "w") as f:
        json.dump({"pretrain_updates": a.updates, "labelled": n_lab, "test": n_test, "lm": tuned, "runs": results,
                   "command_words": commands}, f, indent=1)
    print(f"results: {work}/results.json; logs and fairseq-generate outputs in {work}/")
    untrained = results["untrained (random init, no training)"]["test_cer"]
    ok = loss_fell(curve) and same and fp32 and best["test_cer"] < 0.8 * untrained
    if not ok:
        sys.exit("demo check failed: the pretraining loss must fall, the teacher reload must match, and fine-tuning "
                 "must decode far better than the untrained model")


if __name__ == "__main__":
    main()
