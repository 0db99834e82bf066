"""Beam-search CTC decoding with a word n-gram LM: prep.lm's estimate and the decoders."""
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from d2v_plugin.ctc_decoding import CTCDecoder, DecoderError, DecoderSettings
from d2v_plugin.data.letters import errors, letters_to_words, words_to_letters
from d2v_plugin.modules.ctc import ctc_best_path
from d2v_plugin.prep.lm import BOS, UNK, LMError, build, count_ngrams, estimate, read_sentences

pytest.importorskip("flashlight.lib.text.decoder")

SENTENCES = [
    "the cat sat on the mat", "a dog sat on the log", "the cat ate the rat", "a bird sang on the tree",
    "the dog ate a bone", "my cat likes the warm sun", "the old man fed the bird", "a rat ran under the mat",
    "the girl gave the dog a bone", "we sat under the old tree", "the sun warmed the log", "a man sang to the girl",
]
SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"]  # a dict.ltr.txt's order
BLANK = 0


def write_dict(path):
    path.write_text("".join(f"{s} 1\n" for s in SYMBOLS[4:]))
    return str(path)


def corpus(tmp_path, lines=SENTENCES, name="text.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def arpa_prob(probs, backoffs, word, context, order):
    """p(word | context) the way an ARPA reader computes it: the longest listed n-gram,
    times the backoff weights of the contexts skipped on the way."""
    h = tuple(context)[-(order - 1):] if order > 1 else ()
    weight = 1.0
    while (*h, word) not in probs[len(h)]:
        weight *= backoffs[len(h)].get(h, 1.0) if h else 1.0
        if not h:
            return weight * probs[0][(UNK,)]
        h = h[1:]
    return weight * probs[len(h)][(*h, word)]


# -- the estimate ------------------------------------------------------------------------
def test_modified_kneser_ney_by_hand():
    # sentences "A B", "A B", "B"; too few n-grams for Chen & Goodman's discounts -> lmplz's
    # fallback D = 0.5, 1, 1.5. Bigram context A: a(A B) = 2 -> u = (2 - 1) / 2, gamma(A) = 1 * 1 / 2.
    # Unigram continuation counts A 1 (after <s>), B 2 (after <s>, A), </s> 1; total 4;
    # u(B) = (2 - 1) / 4, gamma() = (0.5 * 2 + 1 * 1) / 4, uniform over {A, B, </s>, <unk>}.
    probs, backoffs, used = estimate(count_ngrams([["A", "B"], ["A", "B"], ["B"]], 2))
    assert used[1]["fallback"] and used[2]["fallback"]
    p_b = 0.25 + 0.5 / 4
    assert probs[0][("B",)] == pytest.approx(p_b)
    assert probs[1][("A", "B")] == pytest.approx(0.5 + 0.5 * p_b)
    assert backoffs[1][("A",)] == pytest.approx(0.5)
    assert probs[0][(UNK,)] == pytest.approx(0.5 / 4)


def test_lm_is_normalised_in_every_context(tmp_path):
    sentences, _ = read_sentences([corpus(tmp_path)])
    probs, backoffs, _ = estimate(count_ngrams(sentences, 3))
    vocab = sorted({w for s in sentences for w in s} | {"</s>", UNK})
    contexts = [(), (BOS,), (BOS, "THE"), ("THE", "CAT"), ("SAT", "ON"), ("MAT",), ("ZEBRA", "THE")]
    for h in contexts:
        assert sum(arpa_prob(probs, backoffs, w, h, 3) for w in vocab) == pytest.approx(1.0, abs=1e-9), h


def test_kenlm_reads_the_arpa_with_our_probabilities(tmp_path):
    from flashlight.lib.text import dictionary as fd
    from flashlight.lib.text.decoder.kenlm import KenLM

    out = tmp_path / "lm"
    build([corpus(tmp_path)], 3, str(out))
    sentences, _ = read_sentences([corpus(tmp_path)])
    probs, backoffs, _ = estimate(count_ngrams(sentences, 3))
    words = fd.create_word_dict(fd.load_words(str(out / "lexicon.txt")))
    lm = KenLM(str(out / "lm.arpa"), words)
    state, context, total, ours = lm.start(False), [BOS], 0.0, 0.0
    for w in "THE DOG SAT ON THE WARM MAT".split():
        state, score = lm.score(state, words.get_index(w))
        total += score
        ours += math.log10(arpa_prob(probs, backoffs, w, context, 3))
        context.append(w)
    assert total == pytest.approx(ours, abs=1e-4)  # flashlight's KenLM scores in log10


def test_prep_lm_excludes_skips_and_fails_clearly(tmp_path):
    text = corpus(tmp_path, SENTENCES + ["the café sat", "naïve cat"])
    test = corpus(tmp_path, SENTENCES[:2], "test.wrd")
    s = build([text], 4, str(tmp_path / "lm"), write_dict(tmp_path / "dict.ltr.txt"), exclude=[test])
    assert s["sentences"] == len(SENTENCES) and s["excluded"] == 2
    assert s["lexicon"]["unspellable_words"] == 2 and set(s["lexicon"]["unspellable_examples"]) == {"CAFÉ", "NAÏVE"}
    lexicon = (tmp_path / "lm" / "lexicon.txt").read_text().splitlines()
    assert "CAT\tC A T |" in lexicon and not any(line.startswith("CAFÉ") for line in lexicon)
    with pytest.raises(LMError, match="no sentences"):
        build([corpus(tmp_path, ["", "  "], "empty.txt")], 4, str(tmp_path / "x"))
    with pytest.raises(LMError, match="missing.txt: text file not found"):
        build([str(tmp_path / "missing.txt")], 4, str(tmp_path / "x"))
    (tmp_path / "words.txt").write_text("A 1\nB 1\n")
    with pytest.raises(LMError, match="no word separator"):
        build([text], 4, str(tmp_path / "x"), str(tmp_path / "words.txt"))
    cli = subprocess.run([sys.executable, "-m", "d2v_plugin.prep.lm", str(tmp_path / "empty.txt"), "--out",
                          str(tmp_path / "y")], capture_output=True, text=True)
    assert cli.returncode != 0 and cli.stderr.strip().splitlines()[-1].startswith("error: ")


# -- the decoders ------------------------------------------------------------------------
def spoken(sentence, rng, noise):
    """Frame log-probs (T, V) of a sentence read letter by letter (2 frames a letter, a blank
    between), the right label favoured by 3 nats, Gaussian noise on every label."""
    frames = []
    for unit in words_to_letters(sentence.upper()).split():
        frames += [SYMBOLS.index(unit)] * 2 + [BLANK]
    logits = torch.tensor([[rng.gauss(0, noise) for _ in SYMBOLS] for _ in frames])
    logits[torch.arange(len(frames)), torch.tensor(frames)] += 3.0
    logits[:, 1:4] = -10.0  # <pad>, </s>, <unk> are never emitted
    return F.log_softmax(logits, -1)


def batch(sentences, seed, noise):
    rng = random.Random(seed)
    emissions = [spoken(s, rng, noise) for s in sentences]
    lengths = torch.tensor([len(e) for e in emissions])
    out = torch.full((len(emissions), int(lengths.max()), len(SYMBOLS)), -1e4)
    for i, e in enumerate(emissions):
        out[i, : len(e)] = e
    return out, lengths


def text(tokens):
    return letters_to_words(" ".join(SYMBOLS[t] for t in tokens.tolist()))


def wer(decoder, lprobs, lengths, refs):
    hyps = [text(t) for t, _, _ in decoder.decode(lprobs, lengths)]
    e = [errors(r.upper().split(), h.split()) for r, h in zip(refs, hyps)]
    return 100.0 * sum(d for d, _ in e) / sum(n for _, n in e)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_without_lm_is_best_path(seed):
    lprobs, lengths = batch(SENTENCES[:4], seed, noise=2.0)
    beam = CTCDecoder(DecoderSettings("beam", beam=1), SYMBOLS, BLANK).decode(lprobs, lengths)
    best = ctc_best_path(lprobs, lengths, BLANK)
    assert [t.tolist() for t, _, _ in beam] == [t.tolist() for t, _, _ in best]
    assert [s for _, _, s in beam] == pytest.approx([s for _, _, s in best], abs=1e-3)


def test_prefix_beam_search_finds_more_probable_labels_than_best_path():
    lprobs, lengths = batch(SENTENCES[:4], 5, noise=2.0)
    beam = CTCDecoder(DecoderSettings("beam", beam=32), SYMBOLS, BLANK).decode(lprobs, lengths)
    best = ctc_best_path(lprobs, lengths, BLANK)
    for b, ((t_beam, _, _), (t_best, _, _)) in enumerate(zip(beam, best)):
        targets = [t_beam, t_best]
        n = int(lengths[b])
        nll = [F.ctc_loss(lprobs[b, :n], t[None], torch.tensor([n]), torch.tensor([len(t)]), BLANK, reduction="sum")
               for t in targets]
        assert nll[0] <= nll[1] + 1e-4  # sums over alignments: the prefix search's labels are at least as likely


def test_word_lm_from_the_references_lowers_wer(tmp_path):
    build([corpus(tmp_path)], 4, str(tmp_path / "lm"), write_dict(tmp_path / "dict.ltr.txt"))
    lprobs, lengths = batch(SENTENCES, 7, noise=0.8)
    greedy = wer(CTCDecoder(DecoderSettings("viterbi"), SYMBOLS, BLANK), lprobs, lengths, SENTENCES)
    lm = DecoderSettings("kenlm", beam=50, lm=str(tmp_path / "lm" / "lm.arpa"), lm_weight=1.0, word_score=0.0)
    with_lm = wer(CTCDecoder(lm, SYMBOLS, BLANK), lprobs, lengths, SENTENCES)
    assert greedy > 20 and with_lm < greedy / 2, (greedy, with_lm)


def test_decoder_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(DecoderError, match="missing.arpa: file not found"):
        CTCDecoder(DecoderSettings("kenlm", lm=str(tmp_path / "missing.arpa")), SYMBOLS, BLANK)
    with pytest.raises(DecoderError, match="choose one of viterbi, beam, kenlm"):
        CTCDecoder(DecoderSettings("greedy"), SYMBOLS, BLANK)
    build([corpus(tmp_path, ["the café sat"])], 2, str(tmp_path / "fr"), "")
    (tmp_path / "fr" / "lexicon.txt").write_text("CAFÉ\tC A F É |\n")
    with pytest.raises(DecoderError, match=r"lexicon.txt: units É are not labels"):
        CTCDecoder(DecoderSettings("kenlm", lm=str(tmp_path / "fr" / "lm.arpa")), SYMBOLS, BLANK)
    (tmp_path / "fr" / "lexicon.txt").write_text("CAT\tC A T |\n")
    (tmp_path / "fr" / "lm.arpa").write_text("not an arpa file\n")
    with pytest.raises(DecoderError, match="lm.arpa: not a KenLM ARPA or binary LM"):
        CTCDecoder(DecoderSettings("kenlm", lm=str(tmp_path / "fr" / "lm.arpa")), SYMBOLS, BLANK)


def test_swept_values_are_read_beside_the_lm(tmp_path):
    build([corpus(tmp_path)], 2, str(tmp_path / "lm"))
    (tmp_path / "lm" / "decoding.json").write_text('{"lm_weight": 0.7, "word_score": -1.5}')
    s = DecoderSettings("kenlm", lm=str(tmp_path / "lm" / "lm.arpa")).resolved()
    assert (s.lm_weight, s.word_score) == (0.7, -1.5) and s.lexicon.endswith("lexicon.txt")
    given = DecoderSettings("kenlm", lm=str(tmp_path / "lm" / "lm.arpa"), lm_weight=2.0).resolved()
    assert (given.lm_weight, given.word_score) == (2.0, -1.5)
    assert "lm_weight 0.7" in s.describe()
