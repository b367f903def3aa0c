"""SQuAD v1.1 data: the official JSON read into flat, validated examples.

    examples = load_squad(path)            # list[SquadExample], in file order
    train, evaluation = default_paths()    # the shared halves of the official dev set

Layout of the file: ``{"version": "1.1", "data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}, ...]}]}]}]}``. Every answer is checked to lie where it
says: ``context[answer_start : answer_start + len(text)] == text``. SQuAD v2.0 files (``is_impossible``
questions, version "v2.0") are rejected: their unanswerable questions need another task and metric.
No torch, no transformers.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

# src/loralab/tasks/squad/data.py -> parents[4] is the repository root; the shared data lie beside it.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[4].parent / "shared" / "data" / "squad"
DEFAULT_TRAIN_FILE = DEFAULT_DATA_DIR / "dev-v1.1-part-a.json"  # 24 articles, 4,961 questions
DEFAULT_EVAL_FILE = DEFAULT_DATA_DIR / "dev-v1.1-part-b.json"   # 24 articles, 5,609 questions


class SquadDataError(ValueError):
    """A SQuAD file that cannot be used; the message names the file, the question and the fix."""


class Answer(NamedTuple):
    text: str
    answer_start: int  # character offset into the context

    @property
    def answer_end(self) -> int:
        """Exclusive character end: ``answer_start + len(text)``."""
        return self.answer_start + len(self.text)


@dataclass(frozen=True)
class SquadExample:
    """One question with its paragraph. ``answers[0]`` is the one trained on (dev sets have several)."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[Answer, ...]

    @property
    def answer_texts(self) -> list[str]:
        return [a.text for a in self.answers]


def default_paths() -> tuple[Path, Path]:
    """(train, eval): the shared halves of the official v1.1 dev set, split by article."""
    return DEFAULT_TRAIN_FILE, DEFAULT_EVAL_FILE


def _locate(context: str, text: str, start: int) -> int | None:
    """The occurrence of ``text`` in ``context`` nearest to ``start``, or None."""
    best, pos = None, context.find(text)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        pos = context.find(text, pos + 1)
    return best


def _answers(path: Path, qa: dict[str, Any], context: str, fix_offsets: bool, fixed: list[str]
             ) -> tuple[Answer, ...]:
    qid = qa["id"]
    out = []
    for j, ans in enumerate(qa["answers"]):
        text, start = ans["text"], ans["answer_start"]
        if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int):
            raise SquadDataError(f"{path}: question {qid!r}, answer {j}: text must be a non-empty string "
                                 f"and answer_start an integer, got {text!r} / {start!r}")
        if context[start:start + len(text)] != text:
            found = _locate(context, text, start) if fix_offsets else None
            if found is None:
                raise SquadDataError(
                    f"{path}: question {qid!r}, answer {j}: context[{start}:{start + len(text)}] is "
                    f"{context[start:start + len(text)]!r}, not the answer {text!r}"
                    + ("; the text does not occur in the context: fix or remove the answer" if fix_offsets
                       else "; fix answer_start, or pass fix_offsets=True to move it to the nearest occurrence"))
            fixed.append(f"{qid}#{j}")
            start = found
        out.append(Answer(text, start))
    if not out:
        raise SquadDataError(f"{path}: question {qid!r} has no answers; every SQuAD v1.1 question has at "
                             "least one (an unanswerable question is SQuAD v2.0, not supported)")
    return tuple(out)


def load_squad(path: str | Path, fix_offsets: bool = False) -> list[SquadExample]:
    """Read an official SQuAD v1.1 JSON file into flat examples (file order), validating every answer.

    ``fix_offsets``: when an ``answer_start`` does not point at its text, move it to the nearest
    occurrence of the text in the context (with a warning giving the count) instead of raising.
    Raises :class:`SquadDataError` on a missing/malformed file, a v2.0 file, repeated ids, empty
    contexts or questions, or a wrong offset.
    """
    p = Path(path)
    if not p.is_file():
        raise SquadDataError(f"{p}: no such file; give the official SQuAD v1.1 JSON (e.g. train-v1.1.json)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SquadDataError(f"{p}: not a UTF-8 JSON file ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise SquadDataError(f'{p}: no top-level "data" list; expected the official SQuAD v1.1 layout')
    version = str(doc.get("version", ""))
    if version.lstrip("v").startswith("2"):
        raise SquadDataError(f"{p}: SQuAD version {version!r}; only SQuAD v1.1 is supported (v2.0's "
                             "unanswerable questions are not): give a v1.1 file")
    examples: list[SquadExample] = []
    seen: set[str] = set()
    fixed: list[str] = []
    try:
        for article in doc["data"]:
            title = str(article.get("title", ""))
            for para in article["paragraphs"]:
                context = para["context"]
                if not isinstance(context, str) or not context.strip():
                    raise SquadDataError(f"{p}: article {title!r} has an empty or non-string context")
                for qa in para["qas"]:
                    qid, question = qa["id"], qa["question"]
                    if qa.get("is_impossible"):
                        raise SquadDataError(
                            f"{p}: question {qid!r} has is_impossible: true (SQuAD v2.0); only SQuAD v1.1 "
                            "is supported: give a v1.1 file or remove the unanswerable questions")
                    if not isinstance(qid, str) or qid in seen:
                        raise SquadDataError(f"{p}: question id {qid!r} is not a string or repeats")
                    if not isinstance(question, str) or not question.strip():
                        raise SquadDataError(f"{p}: question {qid!r} has an empty or non-string question")
                    seen.add(qid)
                    answers = _answers(p, qa, context, fix_offsets, fixed)
                    examples.append(SquadExample(qid, title, context, question, answers))
    except (KeyError, TypeError, AttributeError) as e:
        raise SquadDataError(f"{p}: malformed entry (missing or wrong-typed {e}); expected the official "
                             'SQuAD v1.1 layout {"data": [{"title", "paragraphs": [{"context", "qas": '
                             '[{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}') from e
    if not examples:
        raise SquadDataError(f"{p}: no questions")
    if fixed:
        warnings.warn(f"{p}: moved answer_start of {len(fixed)} answer(s) to the nearest occurrence of "
                      f"their text (e.g. {fixed[0]})", stacklevel=2)
    return examples


def gold_answers(examples: list[SquadExample]) -> dict[str, list[str]]:
    """Question id -> gold answer texts, the input of :func:`loralab.metrics.squad.score_predictions`."""
    return {ex.id: ex.answer_texts for ex in examples}
