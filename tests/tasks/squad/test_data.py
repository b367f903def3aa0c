"""SQuAD v1.1 reading: flat examples, offset validation, v2.0 rejection, the shared default paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loralab.tasks.squad import data
from loralab.tasks.squad.data import Answer, SquadDataError, load_squad

CONTEXT = "Super Bowl 50 was won by the Denver Broncos. The Broncos beat the Panthers."


def _doc(answers=None, **qa_extra) -> dict:
    # "Denver Broncos" starts after "Super Bowl 50 was won by the " = 29 characters
    answers = answers if answers is not None else [{"text": "Denver Broncos", "answer_start": 29},
                                                   {"text": "Broncos", "answer_start": 36}]
    return {"version": "1.1", "data": [{"title": "Super_Bowl_50", "paragraphs": [
        {"context": CONTEXT, "qas": [{"id": "q1", "question": "Who won?", "answers": answers, **qa_extra},
                                     {"id": "q2", "question": "Who lost?",
                                      "answers": [{"text": "Panthers",
                                                   "answer_start": CONTEXT.index("Panthers")}]}]}]}]}


def _write(tmp_path: Path, obj) -> Path:
    p = tmp_path / "squad.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return p


def test_flat_examples(tmp_path):
    exs = load_squad(_write(tmp_path, _doc()))
    assert [e.id for e in exs] == ["q1", "q2"]
    e = exs[0]
    assert (e.title, e.context, e.question) == ("Super_Bowl_50", CONTEXT, "Who won?")
    assert e.answers == (Answer("Denver Broncos", 29), Answer("Broncos", 36))
    assert e.answers[0].answer_end == 29 + len("Denver Broncos")
    assert CONTEXT[29:43] == "Denver Broncos"  # the hand count above
    assert data.gold_answers(exs) == {"q1": ["Denver Broncos", "Broncos"], "q2": ["Panthers"]}


def test_wrong_offset_raises_or_is_moved_with_a_warning(tmp_path):
    path = _write(tmp_path, _doc([{"text": "Broncos", "answer_start": 60}]))
    with pytest.raises(SquadDataError, match="not the answer 'Broncos'.*fix_offsets"):
        load_squad(path)
    # "Broncos" occurs at 36 and at 49 ("The Broncos" after "Broncos. "); 49 is nearer to 60
    assert CONTEXT.index("Broncos", 40) == 49
    with pytest.warns(UserWarning, match="1 answer"):
        exs = load_squad(path, fix_offsets=True)
    assert exs[0].answers == (Answer("Broncos", 49),)
    with pytest.raises(SquadDataError, match="does not occur"):
        load_squad(_write(tmp_path, _doc([{"text": "Seahawks", "answer_start": 0}])), fix_offsets=True)


@pytest.mark.parametrize("doc, message", [
    (_doc(is_impossible=True), "is_impossible"),
    ({**_doc(), "version": "v2.0"}, "only SQuAD v1.1"),
    (_doc([]), "no answers"),
    (_doc([{"text": "", "answer_start": 0}]), "non-empty string"),
    ({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "x"}]}]}]}, "malformed"),
    ({"q1": "x"}, '"data" list'),
    ("{oops", "not a UTF-8 JSON"),
])
def test_bad_files(tmp_path, doc, message):
    with pytest.raises(SquadDataError, match=message):
        load_squad(_write(tmp_path, doc))


def test_repeated_id_and_missing_file(tmp_path):
    doc = _doc()
    doc["data"][0]["paragraphs"][0]["qas"][1]["id"] = "q1"
    with pytest.raises(SquadDataError, match="repeats"):
        load_squad(_write(tmp_path, doc))
    with pytest.raises(SquadDataError, match="no such file"):
        load_squad(tmp_path / "absent.json")


def test_default_paths_are_the_shared_halves():
    # this test file is <repo>/tests/tasks/squad/test_data.py: the shared data lie beside <repo>
    repo = Path(__file__).resolve().parents[3]
    assert data.DEFAULT_DATA_DIR == repo.parent / "shared" / "data" / "squad"
    train, evaluation = data.default_paths()
    assert (train.name, evaluation.name) == ("dev-v1.1-part-a.json", "dev-v1.1-part-b.json")
    if not (train.is_file() and evaluation.is_file()):
        pytest.skip("shared SQuAD data absent")
    a, b = load_squad(train), load_squad(evaluation)
    assert (len(a), len(b)) == (4961, 5609)  # the data README's counts
    assert not {e.id for e in a} & {e.id for e in b}  # split by article: no shared question
