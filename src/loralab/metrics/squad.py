"""SQuAD v1.1 metrics: exact match and token F1, scored as the official v1.1 evaluation script does.

No torch, no transformers: inputs are plain strings. Definitions (``norm`` = :func:`normalize_answer`):

    norm(s)      = collapse_ws(drop_articles(drop_punct(lower(s))))
                   drop_punct   removes every character of Python's ``string.punctuation`` (ASCII only;
                                 e.g. the en dash and curly quotes stay, as in the official script)
                   drop_articles replaces each whole word ``a``/``an``/``the`` (regex ``\\b(a|an|the)\\b``)
                                 by a space
                   collapse_ws  = " ".join(s.split())
    EM(p, g)     = 1 if norm(p) == norm(g) else 0
    F1(p, g)     = 2 P R / (P + R), P = c / |tok(p)|, R = c / |tok(g)|, tok(s) = norm(s).split(),
                   c = |multiset(tok(p)) ∩ multiset(tok(g))|;  F1 = 0 when c = 0 (v1.1 rule: this includes
                   both normalised answers being empty, where EM is 1)
    score(q)     = max over the question's gold answers g of EM(p_q, g)  (resp. F1)
    exact_match  = 100 / N * sum_q score_EM(q),  f1 = 100 / N * sum_q score_F1(q)

N counts *every* question of the dataset; a question without a prediction scores 0 and is counted in
``missing``. A prediction for an id that is not in the dataset is an error (the files do not belong
together), and so is a SQuAD v2.0 file (unanswerable questions need v2.0's rules).

Command line (wired as ``loralab score-squad``): ``main(["DATASET.json", "PREDICTIONS.json"])`` prints
``{"exact_match": ..., "f1": ..., "total": ..., "answered": ..., "missing": ...}`` on its last line.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class SquadFormatError(ValueError):
    """A dataset or predictions file that cannot be scored; the message names the file and the fix."""


def normalize_answer(text: str) -> str:
    """Official v1.1 normalisation: lower-case, drop ASCII punctuation, drop articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalised strings (0.0 when no token is shared, as in the v1.1 script)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_answers(metric: Any, prediction: str, golds: Sequence[str]) -> float:
    """``max(metric(prediction, g) for g in golds)``; a question needs at least one gold answer."""
    if not golds:
        raise ValueError("a SQuAD v1.1 question needs at least one gold answer")
    return max(metric(prediction, g) for g in golds)


def score_predictions(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, Any]:
    """EM and F1 in percent over all ``gold`` questions (id -> gold answer texts).

    Returns ``{"exact_match", "f1", "total", "answered", "missing"}``. Raises ``ValueError`` for a
    prediction whose id is not in ``gold`` or whose answer is not a string, and for an empty ``gold``.
    """
    if not gold:
        raise ValueError("nothing to score: the dataset has no questions")
    extra = [qid for qid in predictions if qid not in gold]
    if extra:
        raise ValueError(f"{len(extra)} prediction id(s) are not in the dataset, e.g. {extra[0]!r}")
    bad = [qid for qid, ans in predictions.items() if not isinstance(ans, str)]
    if bad:
        raise ValueError(f"{len(bad)} prediction(s) are not strings, e.g. {bad[0]!r}: "
                         f"{predictions[bad[0]]!r}")
    em_sum = f1_sum = 0.0
    for qid, golds in gold.items():
        if qid in predictions:
            em_sum += max_over_answers(exact_match, predictions[qid], golds)
            f1_sum += max_over_answers(f1, predictions[qid], golds)
    total, answered = len(gold), len(predictions)
    return {"exact_match": 100.0 * em_sum / total, "f1": 100.0 * f1_sum / total,
            "total": total, "answered": answered, "missing": total - answered}


def _read_json(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SquadFormatError(f"{p}: no such file (the {what})")
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SquadFormatError(f"{p}: not a JSON file ({e}); the {what} must be UTF-8 JSON") from e


def read_gold_answers(dataset_path: str | Path) -> dict[str, list[str]]:
    """Question id -> gold answer texts of an official SQuAD v1.1 file (``{"data": [...]}``)."""
    path = Path(dataset_path)
    doc = _read_json(path, "SQuAD v1.1 dataset")
    expect = ('expected the official SQuAD v1.1 layout {"version": "1.1", "data": [{"title", "paragraphs": '
              '[{"context", "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}')
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise SquadFormatError(f"{path}: no top-level 'data' list; {expect} (was the files' order swapped?)")
    if str(doc.get("version", "")).lstrip("v").startswith("2"):
        raise SquadFormatError(f"{path}: SQuAD version {doc['version']!r}; loralab scores SQuAD v1.1 only "
                               "(v2.0's unanswerable questions need the v2.0 script): give a v1.1 file")
    gold: dict[str, list[str]] = {}
    try:
        for article in doc["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    qid = qa["id"]
                    if qa.get("is_impossible"):
                        raise SquadFormatError(
                            f"{path}: question {qid!r} has is_impossible: true (SQuAD v2.0); loralab scores "
                            "SQuAD v1.1 only: give a v1.1 file or remove the unanswerable questions")
                    if not isinstance(qid, str) or qid in gold:
                        raise SquadFormatError(f"{path}: question id {qid!r} is not a string or repeats; "
                                               "each question needs a unique string id")
                    texts = [a["text"] for a in qa["answers"]]
                    if not texts or not all(isinstance(t, str) for t in texts):
                        raise SquadFormatError(f"{path}: question {qid!r} has no answers or a non-string "
                                               "answer text; every v1.1 question has >= 1 text answer")
                    gold[qid] = texts
    except (KeyError, TypeError) as e:
        raise SquadFormatError(f"{path}: malformed entry (missing or wrong-typed {e}); {expect}") from e
    if not gold:
        raise SquadFormatError(f"{path}: the dataset has no questions")
    return gold


def read_predictions(predictions_path: str | Path) -> dict[str, str]:
    """The official predictions format: one JSON object ``{question id: answer string}``."""
    path = Path(predictions_path)
    preds = _read_json(path, "predictions file")
    if not isinstance(preds, dict):
        raise SquadFormatError(f"{path}: a JSON {type(preds).__name__}, expected one object "
                               '{"question id": "answer text", ...} (was the files\' order swapped?)')
    bad = [k for k, v in preds.items() if not isinstance(v, str)]
    if bad:
        raise SquadFormatError(f"{path}: the answer of {bad[0]!r} is {preds[bad[0]]!r}, not a string "
                               f"({len(bad)} such); give each id one answer string")
    return preds


def score_files(dataset_path: str | Path, predictions_path: str | Path) -> dict[str, Any]:
    """Score a predictions file against an official SQuAD v1.1 dataset file (see the module doc)."""
    gold = read_gold_answers(dataset_path)
    preds = read_predictions(predictions_path)
    extra = [qid for qid in preds if qid not in gold]
    if extra:
        raise SquadFormatError(f"{predictions_path}: {len(extra)} id(s) not in {dataset_path}, e.g. "
                               f"{extra[0]!r}; predict only the dataset's questions (is it the right dataset?)")
    return score_predictions(gold, preds)


def main(argv: Sequence[str] | None = None) -> int:
    """``score-squad DATASET.json PREDICTIONS.json``: print the scores as one JSON line; 2 on bad input."""
    parser = argparse.ArgumentParser(prog="score-squad", description="Official SQuAD v1.1 EM and F1.")
    parser.add_argument("dataset", help="official SQuAD v1.1 JSON (e.g. dev-v1.1.json)")
    parser.add_argument("predictions", help="JSON object {question id: answer}")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its usage error
        return int(e.code or 0)
    try:
        scores = score_files(args.dataset, args.predictions)
    except SquadFormatError as e:
        print(f"score-squad: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
