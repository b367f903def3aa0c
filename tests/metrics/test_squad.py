"""SQuAD v1.1 metrics against hand-worked cases (every expected number is derived in a comment)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loralab.metrics import squad
from loralab.metrics.squad import SquadFormatError, exact_match, f1, normalize_answer, score_files

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "squad"


@pytest.mark.parametrize("text, expected", [
    ("The Cat!", "cat"),                      # lower -> "the cat!" -> "the cat" -> " cat" -> "cat"
    ("an apple a day", "apple day"),          # the articles a/an go, the other words stay
    ("theatre Anne", "theatre anne"),         # articles only as whole words
    ("U.S.A.", "usa"),                        # punctuation is deleted, not replaced by a space
    ("state-of-the-art", "stateoftheart"),    # hyphens go first, so "the" is no longer a word
    ("(the) end", "end"),                     # "(the) end" -> "the end" -> " end" -> "end"
    ("  New\tYork \n", "new york"),           # white space collapsed and stripped
    ("1939\u20131945 \u2019s", "1939\u20131945 \u2019s"),  # en dash, curly quote: not ASCII punctuation
    ("A", ""), ("The the THE", ""),           # only articles -> empty
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_after_normalisation():
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0


def test_f1_hand_worked():
    # "big red dog" vs "red dog barked": 2 common of 3 and 3 -> P = R = 2/3 -> F1 = 2/3
    assert f1("the big red dog", "a red dog barked") == pytest.approx(2 / 3)
    # multiset overlap: {dog:2, cat:1} & {dog:1, cat:2, bird:1} = {dog:1, cat:1} -> c = 2,
    # P = 2/3, R = 2/4 -> F1 = 2 (2/3)(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    assert f1("dog dog cat", "dog cat cat bird") == pytest.approx(4 / 7)
    assert f1("Paris", "paris.") == 1.0
    assert f1("London", "Paris") == 0.0


def test_empty_normalised_answers_v11_rule():
    # both normalise to "": EM 1, and v1.1's F1 is 0 because no token is shared
    assert exact_match("the", "a") == 1.0
    assert f1("the", "a") == 0.0


def test_max_over_answers_takes_the_best_gold_per_metric():
    golds = ["New York", "city of New York"]
    # vs "new york": c = 2, P = 2/3, R = 1 -> F1 = 2 (2/3) / (5/3) = 4/5
    # vs "city of new york": c = 3, P = 3/3, R = 3/4 -> F1 = 2 (3/4) / (7/4) = 6/7 (the maximum)
    assert squad.max_over_answers(f1, "New York City", golds) == pytest.approx(6 / 7)
    assert squad.max_over_answers(exact_match, "new york", golds) == 1.0
    with pytest.raises(ValueError):
        squad.max_over_answers(f1, "x", [])


def _dataset(questions: list[tuple[str, list[str]]], **qa_extra) -> dict:
    context = "Denver Broncos won Super Bowl 50 in Santa Clara, California."
    qas = [{"id": qid, "question": "q?", "answers": [{"text": t, "answer_start": context.find(t)} for t in ans],
            **qa_extra} for qid, ans in questions]
    return {"version": "1.1", "data": [{"title": "SB50", "paragraphs": [{"context": context, "qas": qas}]}]}


def _write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return p


QUESTIONS = [("q1", ["Denver Broncos", "Broncos"]), ("q2", ["Santa Clara, California"]), ("q3", ["50"])]


def test_score_files_averages_over_all_questions(tmp_path):
    data = _write(tmp_path, "dev.json", _dataset(QUESTIONS))
    # q1 exact ("the broncos" -> "broncos"), q2 "Santa Clara" vs "santa clara california": c = 2,
    # P = 1, R = 2/3 -> F1 = 2 (2/3) / (5/3) = 4/5, q3 missing (0).
    preds = _write(tmp_path, "pred.json", {"q1": "the Broncos", "q2": "Santa Clara"})
    out = score_files(data, preds)
    assert out["exact_match"] == pytest.approx(100 * (1 + 0 + 0) / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 4 / 5 + 0) / 3)
    assert (out["total"], out["answered"], out["missing"]) == (3, 2, 1)


def test_score_predictions_in_memory_matches_files():
    gold = dict(QUESTIONS)
    out = squad.score_predictions(gold, {"q3": "fifty"})
    assert (out["exact_match"], out["f1"], out["missing"]) == (0.0, 0.0, 2)
    with pytest.raises(ValueError, match="not in the dataset"):
        squad.score_predictions(gold, {"q9": "x"})


@pytest.mark.parametrize("dataset, preds, message", [
    ("{not json", {}, "not a JSON file"),
    ([1, 2], {}, "no top-level 'data' list"),
    ({"q1": "Broncos"}, {}, "no top-level 'data' list"),                      # files swapped
    ({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"qas": [{"id": "x"}]}]}]}, {},
     "malformed entry"),
    (_dataset(QUESTIONS, is_impossible=True), {}, "is_impossible"),
    ({**_dataset(QUESTIONS), "version": "v2.0"}, {}, "v1.1 only"),
    (_dataset(QUESTIONS + [("q1", ["50"])]), {}, "repeats"),
    (_dataset(QUESTIONS), {"q1": "Broncos", "zz": "x"}, "not in"),
    (_dataset(QUESTIONS), {"q1": ["Broncos"]}, "not a string"),
    (_dataset(QUESTIONS), ["Broncos"], "expected one object"),
    (_dataset(QUESTIONS), "[oops", "not a JSON file"),
])
def test_malformed_files_raise_and_cli_exits_2(tmp_path, capsys, dataset, preds, message):
    data, pred = _write(tmp_path, "dev.json", dataset), _write(tmp_path, "pred.json", preds)
    with pytest.raises(SquadFormatError, match=message):
        score_files(data, pred)
    assert squad.main([str(data), str(pred)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("score-squad: error: ") and message in err


def test_cli_missing_file_and_success(tmp_path, capsys):
    data = _write(tmp_path, "dev.json", _dataset(QUESTIONS))
    assert squad.main([str(data), str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    preds = _write(tmp_path, "pred.json", {"q1": "Broncos", "q2": "x", "q3": "50"})
    assert squad.main([str(data), str(preds)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # q1 and q3 exact, q2 no overlap -> EM = F1 = 100 * 2/3
    assert json.loads(last) == pytest.approx({"exact_match": 200 / 3, "f1": 200 / 3, "total": 3,
                                              "answered": 3, "missing": 0})
    assert squad.main([str(data)]) == 2  # argparse usage error


@pytest.mark.skipif(not (SHARED / "dev-v1.1-part-b.json").is_file(), reason="shared SQuAD data absent")
def test_real_half_gold_as_predictions(tmp_path):
    gold = squad.read_gold_answers(SHARED / "dev-v1.1-part-b.json")
    assert len(gold) == 5609  # the data README's count for part-b
    # predicting each question's first gold answer matches that gold exactly -> 100 / 100
    out = squad.score_predictions(gold, {q: a[0] for q, a in gold.items()})
    assert (out["exact_match"], out["f1"], out["missing"]) == (100.0, 100.0, 0)
    # every question unanswered -> 0 / 0, all counted as missing
    out = squad.score_predictions(gold, {})
    assert (out["exact_match"], out["f1"], out["answered"], out["missing"]) == (0.0, 0.0, 0, 5609)
