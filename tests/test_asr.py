"""Speech recognition: letter labels, CTC pieces, the d2v_ctc model, fairseq-train + fairseq-generate."""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from omegaconf import OmegaConf

from d2v_plugin.data.audio import AudioDataError, LabelledAudioDataset
from d2v_plugin.data.letters import errors, letters_to_words, normalize_text, words_to_letters
from d2v_plugin.models.d2v_ctc import D2vCtcConfig, D2vCtcModel
from d2v_plugin.models.pretrained import PretrainedCheckpointError
from d2v_plugin.modules.ctc import ctc_best_path, finetune_mask
from d2v_plugin.prep.asr_labels import LabelError, prepare
from d2v_plugin.tasks.asr_finetuning import CTCGenerator, D2vAsrFinetuningConfig, D2vAsrFinetuningTask
from d2v_plugin.userdir import user_dir

from .conftest import BIN, REPO, run

FINETUNE_CONFIGS = sorted(glob.glob(os.path.join(REPO, "config", "finetune", "asr", "*.yaml")))


def levenshtein(a, b):
    """Textbook dynamic programme, the test's independent reference."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


# -- letters -------------------------------------------------------------------------
def test_letter_units_round_trip():
    assert normalize_text("It\u2019s a well-known \u201ctest\u201d, isn't it?") == "IT'S A WELL KNOWN TEST ISN'T IT"
    assert words_to_letters("IT'S A") == "I T ' S | A |"
    assert letters_to_words("I T ' S | A |") == "IT'S A"


def test_errors_match_hand_counts():
    assert errors("KITTEN", "SITTING") == (3, 6)
    assert errors("THE CAT SAT".split(), "THE CAT".split()) == (1, 3)
    assert errors("A B C".split(), "X A B C".split()) == (1, 3)
    assert errors([], ["A"]) == (1, 0)


# -- label preparation ----------------------------------------------------------------
def make_corpus(tmp_path, texts, splits):
    """texts: {name: text}; splits: {split: [names]} -> (transcripts.tsv, manifest dir)."""
    corpus, man = tmp_path / "corpus", tmp_path / "man"
    (corpus / "wav").mkdir(parents=True)
    man.mkdir()
    (corpus / "transcripts.tsv").write_text("".join(f"wav/{n}.wav\t{t}\n" for n, t in texts.items()))
    for split, names in splits.items():
        (man / f"{split}.tsv").write_text(f"{corpus / 'wav'}\n" + "".join(f"{n}.wav\t16000\n" for n in names))
    (man / "rejected.tsv").write_text("")
    return corpus / "transcripts.tsv", man


def test_labels_follow_manifest_order(tmp_path):
    tsv, man = make_corpus(tmp_path, {"a": "Hello, world", "b": "It's fine", "c": "A-b c"},
                           {"train": ["c", "a"], "valid": ["b"]})
    assert prepare(str(tsv), str(man)) == {"train": 2, "valid": 1, "dropped": 0}
    assert (man / "train.ltr").read_text().splitlines() == ["A | B | C |", "H E L L O | W O R L D |"]
    assert (man / "train.wrd").read_text().splitlines() == ["A B C", "HELLO WORLD"]
    assert (man / "valid.ltr").read_text() == "I T ' S | F I N E |\n"
    counts = dict(line.split() for line in (man / "dict.ltr.txt").read_text().splitlines())
    assert counts["|"] == "5" and counts["L"] == "3" and counts["O"] == "2" and counts["Z"] == "0"  # train only
    assert len(counts) == 28 and len(Dictionary.load(str(man / "dict.ltr.txt"))) == 32  # + 4 fairseq specials
    assert not (man / "rejected.ltr").exists()


def test_bad_transcripts_are_reported_with_their_lines(tmp_path):
    tsv, man = make_corpus(tmp_path, {"a": "Caf\u00e9 au lait", "c": "fine", "d": " ,"}, {"train": ["a", "b", "c", "d"]})
    with pytest.raises(LabelError) as e:
        prepare(str(tsv), str(man))
    msg = str(e.value)
    assert "3 utterance(s)" in msg
    assert f"{tsv}, line 1: characters '\u00c9'" in msg  # the transcript line
    assert f"{man / 'train.tsv'}, line 3: no transcript for" in msg  # the manifest line (b)
    assert f"{tsv}, line 3: empty transcript" in msg
    assert not (man / "train.ltr").exists()  # nothing written

    counts = prepare(str(tsv), str(man), drop_bad=True)
    assert counts == {"train": 1, "dropped": 3}
    assert (man / "train.tsv").read_text().splitlines()[1:] == ["c.wav\t16000"]
    assert (man / "train.ltr").read_text() == "F I N E |\n"


def test_auto_alphabet_takes_the_train_characters(tmp_path):
    tsv, man = make_corpus(tmp_path, {"a": "\u017dlu\u0165ou\u010dk\u00fd k\u016f\u0148", "b": "kon"}, {"train": ["a", "b"]})
    prepare(str(tsv), str(man), alphabet="auto")
    symbols = [line.split()[0] for line in (man / "dict.ltr.txt").read_text().splitlines()]
    assert set(symbols) == set("\u017dLU\u0164O\u010cK\u00dd\u016e\u0147N|")
    assert (man / "train.ltr").read_text().splitlines()[1] == "K O N |"


@pytest.mark.slow
def test_labelled_dataset_pads_and_aligns(asr_data):
    d = Dictionary.load(str(asr_data / "dict.ltr.txt"))
    ds = LabelledAudioDataset(str(asr_data / "valid.tsv"), str(asr_data / "valid.ltr"), d, shuffle=False)
    lines = (asr_data / "valid.ltr").read_text().splitlines()
    batch = ds.collater([ds[0], ds[1]])
    for row in range(2):
        n = int(batch["target_lengths"][row])
        assert d.string(batch["target"][row, :n]) == lines[ds.entry_ids[row]]
        assert (batch["target"][row, n:] == d.pad()).all()
    lengths = [len(ds[i]["source"]) for i in range(2)]
    assert batch["net_input"]["source"].shape == (2, max(lengths)) and batch["ntokens"] == int(batch["target_lengths"].sum())


def test_labelled_dataset_rejects_misaligned_or_unknown_labels(asr_data, tmp_path):
    d = Dictionary.load(str(asr_data / "dict.ltr.txt"))
    lines = (asr_data / "valid.ltr").read_text().splitlines()
    (tmp_path / "short.ltr").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(AudioDataError, match=f"has {len(lines) - 1} lines but .* lists {len(lines)} files"):
        LabelledAudioDataset(str(asr_data / "valid.tsv"), str(tmp_path / "short.ltr"), d)
    (tmp_path / "bad.ltr").write_text("\n".join(["A # |"] + lines[1:]) + "\n")
    with pytest.raises(AudioDataError, match=r"bad.ltr, line 1: symbols \['#'\] not in the dictionary"):
        LabelledAudioDataset(str(asr_data / "valid.tsv"), str(tmp_path / "bad.ltr"), d)


# -- CTC pieces -------------------------------------------------------------------------
def test_ctc_best_path_merges_repeats_and_drops_blanks():
    frames = [0, 2, 2, 0, 2, 3, 3, 1]  # blank, A, A, blank, A, B, B | padding
    lprobs = F.log_softmax(F.one_hot(torch.tensor(frames), 4).float() * 4, -1)[None]  # (1, 8, 4)
    (tokens, scores, total), = ctc_best_path(lprobs, torch.tensor([7]), blank=0)
    assert tokens.tolist() == [2, 2, 3]  # the blank separates the two A
    best = lprobs[0].max(-1).values
    assert torch.allclose(scores, best[[1, 4, 5]]) and total == pytest.approx(float(best[:7].sum()), abs=1e-5)


def test_finetune_mask_spans_time_and_channels_not_padding():
    g = torch.Generator().manual_seed(0)
    feats = torch.ones(2, 60, 16)
    pad = torch.zeros(2, 60, dtype=torch.bool)
    pad[1, 40:] = True
    emb = torch.full((16,), -1.0)
    out = finetune_mask(feats, pad, 0.5, 5, 0.25, 2, emb, 0.0, g)
    zero_channels = (out == 0).all(1)  # (B, D) channels zeroed at every step
    assert zero_channels.any(1).all()
    rest = out.masked_fill(zero_channels[:, None, :], 7)
    time_masked = (rest == -1).any(-1)
    assert not time_masked[1, 40:].any() and time_masked[0].float().mean() >= 0.3
    assert ((rest == -1) | (rest == 1) | (rest == 7)).all()
    noised = finetune_mask(feats, None, 0.5, 5, 0.0, 2, None, 0.1, g)
    assert ((noised - 1).abs() > 0.5).any(-1).float().mean() >= 0.3  # N(0, 0.1) replaces the masked frames


def test_ctc_generator_output_format():
    class Stub(torch.nn.Module):
        def forward(self, source, padding_mask=None):
            logits = torch.full((2, 5, 6), -5.0)
            logits[0, [0, 1, 3], 5] = 5.0  # E E <blank> E (E = index 5 after 4 specials and "|")
            logits[0, 2, 0] = 5.0
            logits[1, :, 0] = 5.0  # all blank
            return {"logits": logits, "padding_mask": torch.tensor([[False] * 4 + [True], [False] * 5])}

        get_normalized_probs = D2vCtcModel.get_normalized_probs
        output_lengths = staticmethod(D2vCtcModel.output_lengths)

    d = Dictionary()
    for s in ("|", "E"):
        d.add_symbol(s)
    hyps = CTCGenerator(d).generate([Stub()], {"net_input": {"source": torch.zeros(2, 100)}})
    assert [len(h) for h in hyps] == [1, 1]
    first = hyps[0][0]
    assert first["tokens"].tolist() == [5, 5] and first["alignment"] is None
    assert first["positional_scores"].shape == (2,) and isinstance(first["score"], float)
    assert d.string(first["tokens"]) == "E E" and hyps[1][0]["tokens"].numel() == 0


# -- the model -----------------------------------------------------------------------
def ctc_cfg(**kw):
    """The model config as fairseq hands it over: a structured OmegaConf with ``_name``."""
    return OmegaConf.structured(D2vCtcConfig(_name="d2v_ctc", **kw))


def asr_task(asr_data, **kw):
    return D2vAsrFinetuningTask.setup_task(D2vAsrFinetuningConfig(data=str(asr_data), seed=1, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["v1", "v2"])
def test_ctc_model_starts_from_the_pretrained_student(pretrained, asr_data, algorithm):
    path, _ = pretrained(algorithm)
    task = asr_task(asr_data)
    cfg = ctc_cfg(pretrained_path=str(path), freeze_finetune_updates=1, layerdrop=0.0, activation_dropout=0.2)
    model = task.build_model(cfg)
    saved = torch.load(path, weights_only=True)["model"]
    enc = model.encoder
    assert enc.teacher is None and enc.final_proj is None and enc.modality_encoders["audio"].decoder is None
    assert enc.settings.algorithm == algorithm and enc.settings.audio.feature_grad_mult == 0.0 and enc.settings.activation_dropout == 0.2
    for k, v in enc.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert model.proj.out_features == len(task.target_dictionary)
    assert cfg.pretrained_args["model"]["algorithm"] == algorithm and cfg.pretrained_args["task"]["normalize"] is True

    scratch = task.build_model(ctc_cfg(pretrained_path=str(path), random_init=True)).encoder.state_dict()
    assert scratch.keys() == enc.state_dict().keys()
    assert not torch.equal(scratch["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])

    reloaded = task.build_model(ctc_cfg(pretrained_path="/nonexistent.pt", pretrained_args=cfg.pretrained_args))
    assert reloaded.encoder.state_dict().keys() == enc.state_dict().keys()  # rebuilt from the stored config alone

    task.load_dataset("valid")
    batch = task.datasets["valid"].collater([task.datasets["valid"][i] for i in range(2)])
    criterion = task.build_criterion(OmegaConf.create({"_name": "d2v_ctc"}))
    model.train()
    loss, sample_size, log = criterion(model, batch)  # update 0 < freeze_finetune_updates: only the head learns
    loss.backward()
    assert model.proj.weight.grad is not None and enc.blocks[0].mlp.fc1.weight.grad is None
    model.zero_grad()
    model.set_num_updates(1)
    criterion(model, batch)[0].backward()
    assert enc.blocks[0].mlp.fc1.weight.grad is not None
    assert all(p.grad is None for p in enc.modality_encoders["audio"].feature_extractor.parameters())  # frozen CNN
    model.eval()
    _, _, log = criterion(model, batch)
    assert log["c_total"] == int(batch["target_lengths"].sum()) and log["w_total"] > 0


def test_normalize_mismatch_and_wrong_checkpoints_fail_clearly(pretrained, asr_data, tmp_path):
    path, _ = pretrained("v2")
    with pytest.raises(ValueError, match="task.normalize=False but the pretrained model was trained with normalize=True"):
        asr_task(asr_data, normalize=False).build_model(ctc_cfg(pretrained_path=str(path)))
    with pytest.raises(PretrainedCheckpointError, match="file not found"):
        asr_task(asr_data).build_model(ctc_cfg(pretrained_path=str(tmp_path / "none.pt")))
    ckpt = torch.load(path, weights_only=True)
    ckpt["cfg"]["model"]["_name"] = "wav2vec2"
    torch.save(ckpt, tmp_path / "w2v.pt")
    with pytest.raises(PretrainedCheckpointError, match="neither a d2v_plugin pretraining checkpoint .* nor an official data2vec one"):
        asr_task(asr_data).build_model(ctc_cfg(pretrained_path=str(tmp_path / "w2v.pt")))


def test_layer_decay_scales_learning_rates(pretrained, asr_data):
    path, _ = pretrained("v2")
    model = asr_task(asr_data).build_model(ctc_cfg(pretrained_path=str(path), layer_decay=0.5))
    L = len(model.encoder.blocks)
    assert L == 2
    scale = lambda p: getattr(p, "optim_overrides", {"optimizer": {"lr_scale": 1.0}})["optimizer"]["lr_scale"]  # noqa: E731
    assert scale(model.encoder.blocks[1].mlp.fc1.weight) == 1.0 and scale(model.encoder.blocks[0].mlp.fc1.weight) == 0.5
    assert scale(next(model.encoder.modality_encoders["audio"].pos_conv.parameters())) == 0.25
    assert scale(model.proj.weight) == 1.0


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=os.path.basename)
def test_finetune_yaml_composes(path):
    y = OmegaConf.load(path)
    assert OmegaConf.is_missing(y.task, "data") and OmegaConf.is_missing(y.model, "pretrained_path")
    assert y.task._name == "d2v_asr_finetuning" and y.model._name == "d2v_ctc" and y.criterion._name == "d2v_ctc"
    # the tiny demo recipe selects by letter error rate (its WERs are all 90-100), the base recipes by WER
    metric = "uer" if os.path.basename(path) == "tiny.yaml" else "wer"
    assert y.task.normalize is True and y.checkpoint.best_checkpoint_metric == metric
    assert y.checkpoint.maximize_best_checkpoint_metric is False
    for dc, section in ((D2vCtcConfig, y.model), (D2vAsrFinetuningConfig, y.task)):
        values = OmegaConf.to_container(section)
        values.pop("_name")
        OmegaConf.merge(OmegaConf.structured(dc), values)  # unknown keys or wrong types raise


# -- the binaries ----------------------------------------------------------------------
@pytest.mark.slow
def test_fairseq_train_then_generate_scores_wer(pretrained, asr_data, tmp_path):
    path, _ = pretrained("v2")
    log = run([os.path.join(BIN, "fairseq-train"), str(asr_data), "--user-dir", user_dir(), "--task", "d2v_asr_finetuning",
               "--arch", "d2v_ctc", "--pretrained-path", str(path), "--criterion", "d2v_ctc", "--optimizer", "adam",
               "--lr", "0.0005", "--lr-scheduler", "fixed", "--max-update", "4", "--max-tokens", "200000",
               "--num-workers", "0", "--seed", "1", "--required-batch-size-multiple", "1", "--save-dir", str(tmp_path / "ft"),
               "--best-checkpoint-metric", "wer", "--log-format", "simple", "--log-interval", "1"])
    wer = re.findall(r"valid on 'valid' subset .*\| uer [\d.]+ \| wer ([\d.]+)", log)
    assert wer, log[-2000:]
    best = tmp_path / "ft" / "checkpoint_best.pt"
    score = re.search(r"checkpoint_best.pt \(epoch \d+ @ \d+ updates, score ([\d.]+)\)", log)
    assert score and float(score.group(1)) == float(wer[-1])  # the best checkpoint is chosen by WER

    # make the decoder say "A" on every frame so hypotheses share words with the references
    ckpt = torch.load(best, weights_only=True)
    d = Dictionary.load(str(asr_data / "dict.ltr.txt"))
    ckpt["model"]["proj.weight"].zero_()
    ckpt["model"]["proj.bias"].fill_(-10.0)
    ckpt["model"]["proj.bias"][d.index("A")] = 10.0
    torch.save(ckpt, tmp_path / "says_a.pt")
    out = run([os.path.join(BIN, "fairseq-generate"), str(asr_data), "--user-dir", user_dir(), "--task", "d2v_asr_finetuning",
               "--path", str(tmp_path / "says_a.pt"), "--gen-subset", "valid", "--scoring", "wer", "--post-process", "letter",
               "--batch-size", "4", "--num-workers", "0"])
    refs = dict(re.findall(r"^T-(\d+)\t(.*)$", out, re.M))
    hyps = {i: text for i, _, text in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", out, re.M)}
    words = (asr_data / "valid.wrd").read_text().splitlines()
    assert sorted(refs.values()) == sorted(words) and set(hyps.values()) == {"A"} and refs.keys() == hyps.keys()
    dist = sum(levenshtein(refs[i].split(), hyps[i].split()) for i in refs)
    expected = 100.0 * dist / sum(len(r.split()) for r in refs.values())
    assert expected < 100.0  # some references contain the word "A"
    reported = float(re.search(r"WER: ([\d.]+)", out).group(1))
    assert reported == pytest.approx(expected, abs=0.006)
    assert re.search(r"^Generate valid with beam=1: WER", out, re.M)  # best path is beam 1, whatever --beam says

    # the beam decoders through the same binary; d2v_wer's summary names the decoder and adds the CER
    generate = [os.path.join(BIN, "fairseq-generate"), str(asr_data), "--user-dir", user_dir(), "--task",
                "d2v_asr_finetuning", "--path", str(tmp_path / "says_a.pt"), "--gen-subset", "valid", "--scoring",
                "d2v_wer", "--post-process", "letter", "--batch-size", "4", "--num-workers", "0"]
    beam = run(generate + ["--decoder", "beam", "--beam", "1"])
    assert {i: t for i, _, t in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", beam, re.M)} == hyps
    assert re.search(rf"beam=1: WER: {reported:.2f}, CER: [\d.]+, decoder: beam \(prefix search, beam 1, no LM\)", beam)
    run([sys.executable, "-m", "d2v_plugin.prep.lm", str(asr_data / "train.wrd"), "--order", "3", "--out",
         str(tmp_path / "lm"), "--dict", str(asr_data / "dict.ltr.txt")])
    lm = run(generate + ["--decoder", "kenlm", "--decoder-lm", str(tmp_path / "lm" / "lm.arpa"), "--beam", "8"])
    assert re.search(r"beam=8: WER: [\d.]+, CER: [\d.]+, decoder: kenlm \(beam 8, LM lm.arpa, lm_weight 2", lm)
    bad = subprocess.run(generate + ["--decoder", "kenlm", "--decoder-lm", str(tmp_path / "none.arpa")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "none.arpa: file not found" in bad.stderr


@pytest.mark.slow
def test_fairseq_hydra_train_tiny_finetune_yaml(pretrained, asr_data, tmp_path):
    path, _ = pretrained("v1")
    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/asr"),
               "--config-name", "tiny", f"task.data={asr_data}", f"model.pretrained_path={path}",
               f"common.user_dir={user_dir()}", f"checkpoint.save_dir={tmp_path / 'ft'}", f"hydra.run.dir={tmp_path / 'hydra'}",
               "optimization.max_update=3", "dataset.num_workers=0", "model.freeze_finetune_updates=2"])
    assert "done training" in log and "| wer " in log
    saved = torch.load(tmp_path / "ft" / "checkpoint_last.pt", weights_only=True)
    assert saved["cfg"]["model"]["pretrained_args"]["model"]["algorithm"] == "v1"  # reloads without the pretraining file
    assert "proj.weight" in saved["model"] and not any(k.startswith("encoder.teacher") or "_ema" in k for k in saved["model"])
