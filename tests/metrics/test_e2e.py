"""E2E metrics against the official scorer's test vector and hand-computed expectations.

Only three tests start Java (the PTB tokenizer, and METEOR once, ~15 s); the rest is pure Python.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest

from loralab.metrics import e2e
from loralab.metrics.e2e_mteval import (
    closest_ref_length,
    corpus_bleu,
    corpus_nist,
    mteval_tokenize,
    nist_information,
    nist_length_penalty,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR/PTB tokenizer need Java")

# Official scorer (tuetschek/e2e-metrics measure_scores.py), two MRs.
VECTOR_HYPS = [
    "The Eagle is a cheap coffee shop in the city centre near Burger King.",
    "Zizzi is a kid-friendly pub with a high customer rating.",
]
VECTOR_REFS = [
    [
        "The Eagle is a cheap coffee shop near Burger King in the city centre.",
        "Near Burger King in the city centre is The Eagle, an inexpensive coffee shop.",
    ],
    [
        "Zizzi is a family-friendly pub with a customer rating of 5 out of 5.",
        "The pub Zizzi is kid friendly and has a high customer rating.",
    ],
]
VECTOR_SCORES = {
    "BLEU": 0.5832666782576015,
    "NIST": 4.774196476173407,
    "METEOR": 0.5010742845718955,
    "ROUGE_L": 0.7164645699128458,
    "CIDEr": 4.3129993576686125,
}


def _bleu(hyps, refs):
    return corpus_bleu([mteval_tokenize(h) for h in hyps], [[mteval_tokenize(r) for r in g] for g in refs])


def _nist(hyps, refs):
    return corpus_nist([mteval_tokenize(h) for h in hyps], [[mteval_tokenize(r) for r in g] for g in refs])


# ---------------------------------------------------------------- official test vector (Java)


@needs_java
def test_official_test_vector_all_metrics():
    scores = e2e.score(VECTOR_HYPS, VECTOR_REFS)
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    for key, expected in VECTOR_SCORES.items():
        assert scores[key] == pytest.approx(expected, abs=1e-6), key


def test_official_test_vector_bleu_nist_without_java():
    assert _bleu(VECTOR_HYPS, VECTOR_REFS) == pytest.approx(VECTOR_SCORES["BLEU"], abs=1e-9)
    assert _nist(VECTOR_HYPS, VECTOR_REFS) == pytest.approx(VECTOR_SCORES["NIST"], abs=1e-9)


# ---------------------------------------------------------------- mteval tokenisation


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("The Eagle, near Café Rouge.", ["the", "eagle", ",", "near", "café", "rouge", "."]),
        ("£20-25 and 5.5 stars, 1,000 seats", ["£20", "-", "25", "and", "5.5", "stars", ",", "1,000", "seats"]),
        ("kid-friendly R&B it's A/B (x)", ["kid-friendly", "r", "&", "b", "it's", "a", "/", "b", "(", "x", ")"]),
        ("&quot;Hi&quot; &amp; &lt;b&gt;", ['"', "hi", '"', "&", "<", "b", ">"]),
        ("ÉLAN Straße", ["Élan", "straße"]),  # only A-Z are lowercased, like Perl's tr/[A-Z]/[a-z]/
        ("  spaced\u00a0out\t ", ["spaced", "out"]),
        ("", []),
    ],
)
def test_mteval_tokenize(text, tokens):
    assert mteval_tokenize(text) == tokens


# ---------------------------------------------------------------- BLEU by hand


def test_bleu_brevity_penalty_single_reference():
    # p_1..p_4 = 1; c = 4, r = 5 -> BP = exp(1 - 5/4)
    assert _bleu(["a b c d"], [["a b c d e"]]) == pytest.approx(math.exp(-0.25), rel=1e-12)


def test_bleu_no_penalty_when_longer():
    # c = 5 > r = 4: BP = 1; p = 4/5, 3/4, 2/3, 1/2
    expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert _bleu(["a b c d e"], [["a b c d"]]) == pytest.approx(expected, rel=1e-12)


def test_bleu_closest_reference_tie_takes_shorter_and_clips_per_reference():
    # hyp length 4; refs of length 3 and 5 tie -> r = 3 -> BP = 1.
    # matches: unigrams a b c (3/4), bigrams ab bc (2/3), trigram abc (1/2), no 4-gram -> 1/(2*1).
    expected = (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    assert _bleu(["a b c x"], [["a b c", "a b c d e"]]) == pytest.approx(expected, rel=1e-12)
    assert _bleu(["a b c x"], [["a b c d e", "a b c"]]) == pytest.approx(expected, rel=1e-12)
    assert closest_ref_length(4, [5, 3]) == 3 and closest_ref_length(4, [3, 5]) == 3
    assert closest_ref_length(4, [9, 6, 2]) == 2  # tie 6 vs 2 -> the shorter
    assert closest_ref_length(1, [5, 0]) == 5  # empty (padding) references are skipped


def test_bleu_clipping_and_mteval_smoothing():
    # "the the the" vs "the cat": p1 = 1/3; no bigram match -> 1/(2*2); no trigram -> 1/(4*1);
    # no 4-gram in the hypothesis -> contributes log 1 = 0. c = 3 > r = 2.
    expected = math.exp((math.log(1 / 3) + math.log(1 / 4) + math.log(1 / 4)) / 4)
    assert _bleu(["the the the"], [["the cat"]]) == pytest.approx(expected, rel=1e-12)


def test_bleu_is_corpus_level_not_mean_of_sentences():
    # sums: m = (4+1, 3+0, 2, 1), t = (4+2, 3+1, 2, 1); r = 4 + 2 = c -> BP = 1
    expected = (5 / 6 * 3 / 4 * 2 / 2 * 1 / 1) ** 0.25
    assert _bleu(["a b c d", "x y"], [["a b c d"], ["x z"]]) == pytest.approx(expected, rel=1e-12)


def test_bleu_case_insensitive_and_empty_output():
    assert _bleu(["The Cat Sat Down"], [["the cat sat down"]]) == pytest.approx(1.0)
    assert _bleu([""], [["the cat"]]) == 0.0


# ---------------------------------------------------------------- NIST by hand


def test_nist_information_weights_by_hand():
    refs = [[["a", "b"], ["a", "c"]]]  # 4 reference words; a x2, b, c, "a b", "a c"
    info = nist_information(refs)
    assert info[("a",)] == pytest.approx(math.log2(4 / 2))
    assert info[("b",)] == pytest.approx(math.log2(4 / 1))
    assert info[("a", "b")] == pytest.approx(math.log2(2 / 1))  # count(a) / count(a b)


def test_nist_score_by_hand():
    # matched info: unigrams a (1) + b (2) over 2 words; bigram "a b" (1) over 1; LP ratio 2 / 2 = 1
    assert _nist(["a b"], [["a b", "a c"]]) == pytest.approx(3 / 2 + 1 / 1, rel=1e-12)


def test_nist_length_penalty():
    assert nist_length_penalty(2 / 3) == pytest.approx(0.5, rel=1e-12)
    assert nist_length_penalty(1.0) == 1.0 and nist_length_penalty(1.7) == 1.0
    assert nist_length_penalty(0.0) == 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert nist_length_penalty(0.5) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2), rel=1e-12)
    # hypothesis "a" against "a b": info(a) = log2(2) = 1 over 1 word; ratio 1 / 2
    assert _nist(["a"], [["a b"]]) == pytest.approx(nist_length_penalty(0.5), rel=1e-12)


def test_nist_reference_length_is_edited_mteval_average():
    # refs: MR1 one ref of 3 words, MR2 three refs of 1 word: 6 words / (4 refs / 2 MRs) = 3
    # (a per-MR mean would give 3 + 1 = 4). Hyp length 2 -> ratio 2/3 -> LP = 0.5.
    # info(p) = log2(6/1), info(s) = log2(6/2); 2 hypothesis words.
    expected = 0.5 * (math.log2(6) + math.log2(3)) / 2
    assert _nist(["p", "s"], [["p q r"], ["s", "s", "t"]]) == pytest.approx(expected, rel=1e-12)


def test_nist_keeps_mteval_zero_prefix_quirk():
    # mteval tests the prefix string for truth; "0" is false in Perl, so info("0 a") uses the total
    # word count (2) as its denominator: log2(2/1) = 1 instead of log2(1/1) = 0.
    info = nist_information([[["0", "a"]]])
    assert info[("0", "a")] == pytest.approx(1.0)
    assert _nist(["0 a"], [["0 a"]]) == pytest.approx((1 + 1) / 2 + 1, rel=1e-12)


# ---------------------------------------------------------------- ROUGE-L / CIDEr (PTB tokenizer, Java)


def _cider_d_reference(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """CIDEr-D written from its definition (Vedantam et al. 2015, coco-caption's D variant):
    tf-idf n-gram vectors g_n (tf = raw count, idf = ln N - ln max(1, df)), clipped cosine
    sum_w min(g_h, g_r) g_r / (|g_h| |g_r|), Gaussian penalty exp(-d^2 / 72) on the length difference
    (coco-caption measures it in bigrams), mean over n = 1..4 and references, times 10, mean over MRs."""

    def grams(tokens, n):
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    df = Counter()
    for group in refs:
        df.update({g for r in group for n in range(1, 5) for g in grams(r, n)})
    log_n = math.log(len(refs))

    def vec(tokens, n):
        return {g: c * (log_n - math.log(max(1, df[g]))) for g, c in grams(tokens, n).items()}

    total = 0.0
    for hyp, group in zip(hyps, refs):
        per_ref = []
        for ref in group:
            penalty = math.exp(-((max(len(hyp) - 1, 0) - max(len(ref) - 1, 0)) ** 2) / (2 * 6.0**2))
            sims = []
            for n in range(1, 5):
                gh, gr = vec(hyp, n), vec(ref, n)
                dot = sum(min(v, gr.get(g, 0.0)) * gr.get(g, 0.0) for g, v in gh.items())
                nh, nr = math.sqrt(sum(v * v for v in gh.values())), math.sqrt(sum(v * v for v in gr.values()))
                sims.append(dot / (nh * nr) * penalty if nh and nr else 0.0)
            per_ref.append(sum(sims) / 4)
        total += 10 * sum(per_ref) / len(group)
    return total / len(hyps)


@needs_java
def test_rouge_l_and_cider_by_hand():
    hyps = ["a b c d", "the pub is nice", "x y"]
    refs = [["a c d e f", "b c"], ["the pub is very nice", "nice pub"], ["x y z", "y x"]]
    scores = e2e.coco_scores(hyps, refs, metrics=("ROUGE_L", "CIDEr"))
    beta2 = 1.2**2

    def f(p, r):
        return (1 + beta2) * p * r / (r + beta2 * p)

    # max P and max R over references, each possibly from a different reference:
    rouge_1 = f(max(3 / 4, 2 / 4), max(3 / 5, 2 / 2))  # LCS a-c-d (ref 1), b-c (ref 2)
    rouge_2 = f(max(4 / 4, 1 / 4), max(4 / 5, 1 / 2))  # LCS 4 with ref 1; LCS("...", "nice pub") = 1
    rouge_3 = f(max(2 / 2, 1 / 2), max(2 / 3, 1 / 2))
    assert scores["ROUGE_L"] == pytest.approx((rouge_1 + rouge_2 + rouge_3) / 3, rel=1e-12)
    expected_cider = _cider_d_reference([h.split() for h in hyps], [[r.split() for r in g] for g in refs])
    assert scores["CIDEr"] == pytest.approx(expected_cider, rel=1e-9)


@needs_java
def test_perfect_outputs_and_ptb_tokenisation():
    # Every n-gram belongs to one MR only (df = 1), outputs equal their single reference:
    # CIDEr-D = 10 (each cosine is 1, no length penalty), ROUGE-L = 1.
    hyps = ["Alpha Bravo, Charlie delta.", "Echo foxtrot golf hotel india"]
    scores = e2e.coco_scores(hyps, [[h] for h in hyps], metrics=("ROUGE_L", "CIDEr"))
    assert scores["ROUGE_L"] == pytest.approx(1.0) and scores["CIDEr"] == pytest.approx(10.0)
    assert _bleu(hyps, [[h] for h in hyps]) == pytest.approx(1.0)
    # PTB: lowercased, punctuation tokens dropped (but not the lowercased -lrb-, as in coco-caption),
    # empty sentences keep their place, Java's extra line breaks cannot shift the alignment.
    tokens = e2e_coco_tokenize(["The Eagle, (cheap).", "", "a\u2028b", "It's £20--25!", ""])
    assert tokens == ["the eagle -lrb- cheap -rrb-", "", "a b", "it 's # 20 25", ""]


def e2e_coco_tokenize(sentences):
    from loralab.metrics.e2e_coco import ptb_tokenize

    return ptb_tokenize(sentences)


# ---------------------------------------------------------------- input checks and files


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="one output per unique MR"):
        e2e.score(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="no references"):
        e2e.score(["a"], [[]])
    with pytest.raises(ValueError, match="empty"):
        e2e.score(["a"], [["  "]])
    with pytest.raises(ValueError, match="line break"):
        e2e.score(["a\nb"], [["a"]])
    with pytest.raises(TypeError, match="list of reference strings"):
        e2e.score(["a"], ["a"])


@pytest.fixture
def fake_coco(monkeypatch):
    """Replace the Java metrics by a recorder: file plumbing tests need no JVM."""
    calls = []

    def recorder(hyps, refs, metrics=("METEOR", "ROUGE_L", "CIDEr")):
        calls.append((list(hyps), [list(g) for g in refs]))
        return {"METEOR": 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0}

    monkeypatch.setattr(e2e, "coco_scores", recorder)
    return calls


def test_score_files_official_format(tmp_path, fake_coco):
    hyp = tmp_path / "hyp.txt"
    ref = tmp_path / "refs.txt"
    hyp.write_text("\ufeff" + "\n".join(VECTOR_HYPS) + "\n", encoding="utf-8")  # BOM, final newline
    ref.write_text("\r\n".join(VECTOR_REFS[0]) + "\r\n\r\n" + "\r\n".join(VECTOR_REFS[1]) + "\r\n\r\n", encoding="utf-8")
    scores = e2e.score_files(str(hyp), str(ref))
    assert fake_coco == [(VECTOR_HYPS, VECTOR_REFS)]
    assert scores["BLEU"] == pytest.approx(VECTOR_SCORES["BLEU"], abs=1e-9)
    assert scores["NIST"] == pytest.approx(VECTOR_SCORES["NIST"], abs=1e-9)


def test_reference_file_forms(tmp_path):
    single = tmp_path / "single.txt"
    single.write_text("r1\nr2\nr3\n", encoding="utf-8")  # no blank line: one reference per MR
    assert e2e.read_references(str(single), n_outputs=3) == [["r1"], ["r2"], ["r3"]]
    assert e2e.read_references(str(single), n_outputs=1) == [["r1", "r2", "r3"]]
    double = tmp_path / "double.txt"
    double.write_text("r1\n\n\nr2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3: empty reference group"):
        e2e.read_references(str(double))
    leading = tmp_path / "leading.txt"
    leading.write_text("\nr1\n\nr2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1"):
        e2e.read_references(str(leading))


def test_score_files_count_mismatch_is_clear(tmp_path, fake_coco):
    hyp = tmp_path / "hyp.txt"
    ref = tmp_path / "refs.txt"
    hyp.write_text("one\ntwo\nthree\n", encoding="utf-8")
    ref.write_text("a\nb\n\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match="3 outputs but .* 2 reference groups"):
        e2e.score_files(str(hyp), str(ref))
    assert e2e.main([str(hyp), str(ref)]) == 2
    assert fake_coco == []


def test_score_files_with_csv_references_groups_first_seen(tmp_path, fake_coco):
    csv_path = tmp_path / "refs.csv"
    csv_path.write_text(
        'mr,ref\n"name[B], food[Thai]","B serves Thai food, ""cheap""."\nname[A],A one.\n'
        '"name[B], food[Thai]",B two.\n',
        encoding="utf-8",
    )
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("B is Thai.\nA is a place.\n", encoding="utf-8")
    e2e.score_files(str(hyp), str(csv_path))
    assert fake_coco[0][1] == [['B serves Thai food, "cheap".', "B two."], ["A one."]]


def test_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("meaning,text\nx,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'mr' and 'ref'"):
        e2e.read_e2e_csv(str(bad))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("mr,ref\nx,y,z\n", encoding="utf-8")
    with pytest.raises(ValueError, match="record 2: 3 fields"):
        e2e.read_e2e_csv(str(ragged))
    with pytest.raises(ValueError, match="no non-empty reference"):
        e2e.group_references([("m", ""), ("m", " ")])


def test_cli_prints_one_json_object(tmp_path, fake_coco, capsys):
    hyp = tmp_path / "hyp.txt"
    ref = tmp_path / "refs.txt"
    hyp.write_text("\n".join(VECTOR_HYPS), encoding="utf-8")
    ref.write_text("\n".join(VECTOR_REFS[0]) + "\n\n" + "\n".join(VECTOR_REFS[1]), encoding="utf-8")
    assert e2e.main([str(hyp), str(ref)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert out["BLEU"] == pytest.approx(VECTOR_SCORES["BLEU"], abs=1e-9)
