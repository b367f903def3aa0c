"""Generative SQuAD for causal LMs in the seed's format, with answer-only labels and counted truncation.

    text = "<Q> {question} <C> {context} <A> {answer}" + eos      (markers configurable: GenFormat)

The sequence is built from separately tokenized pieces (no special tokens added), so the prompt a
model sees at evaluation is token for token the prefix it was trained on:

    head = tok("<Q> {question} <C>"),  ctx = tok(" {context}"),  tail = tok(" <A>"),  ans = tok(" {answer}")
    input_ids = head + ctx[lo:hi] + tail + ans + [eos]
    labels    = [-100] * (len(head) + (hi - lo) + len(tail)) + ans + [eos]        (answer-only loss)

Context budget: ``B = max_length - len(head) - len(tail) - len(ans) - 1`` for training,
``B = max_length - len(head) - len(tail) - max_new_tokens`` for evaluation prompts. When ``len(ctx) > B``
the kept window ``[lo, hi)`` of ``B`` tokens is, by ``keep``: ``"start"`` -> ``[0, B)``; ``"center"``
(symmetric) -> ``lo = (len(ctx) - B) // 2``. For training the window is then slid by the fewest tokens
that bring the trained answer (``answers[0]``) inside; an answer longer than ``B`` cannot fit, its window
starts at the answer. A question *has its answer cut* when no gold answer (training: the trained
answer) lies wholly inside ``[lo, hi)``; such questions are kept and counted in the
:class:`TruncationReport`, never dropped. The tokenizer must be fast (offset mappings) and should encode a
leading space as part of the next word (byte-level BPE: GPT-2, SmolLM2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch

from loralab.tasks.squad.data import SquadExample

IGNORE_INDEX = -100
Keep = Literal["start", "center"]


@dataclass(frozen=True)
class GenFormat:
    """The markers of ``"<Q> {question} <C> {context} <A> {answer}<eos>"``."""

    question_marker: str = "<Q>"
    context_marker: str = "<C>"
    answer_marker: str = "<A>"

    def prompt(self, question: str, context: str) -> str:
        """The evaluation prompt as text: ``f"{Q} {question} {C} {context} {A}"``."""
        return f"{self.question_marker} {question} {self.context_marker} {context} {self.answer_marker}"

    @property
    def markers(self) -> tuple[str, str, str]:
        return self.question_marker, self.context_marker, self.answer_marker


@dataclass
class GenFeature:
    """One question's token ids. ``labels`` is None for evaluation prompts."""

    id: str
    input_ids: list[int]
    labels: list[int] | None
    prompt_length: int          # tokens before the answer (the whole sequence for prompts)
    context_truncated: bool     # the context lost tokens to the budget
    answer_in_context: bool     # a gold answer (training: answers[0]) lies wholly in the kept context


@dataclass
class TruncationReport:
    total: int = 0
    context_truncated: int = 0
    answer_cut: int = 0         # questions whose gold answer is not in the kept context

    @property
    def share_answer_cut(self) -> float:
        """``answer_cut / total`` (0 for no questions)."""
        return self.answer_cut / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "share_answer_cut": self.share_answer_cut}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _context_tokens(tokenizer: Any, context: str) -> tuple[list[int], list[tuple[int, int]]]:
    """ids and offsets of ``" " + context``, offsets shifted to index ``context`` itself."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("generative SQuAD needs a fast tokenizer (offset mappings) to truncate around answers")
    enc = tokenizer(" " + context, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [(s - 1, e - 1) for s, e in enc["offset_mapping"]]


def _token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) of the context tokens overlapping characters [start, end)."""
    hits = [t for t, (s, e) in enumerate(offsets) if s < end and e > start]
    if not hits:
        raise ValueError(f"no token overlaps characters [{start}, {end}) of the context")
    return hits[0], hits[-1] + 1


def _window(n: int, budget: int, keep: Keep) -> tuple[int, int]:
    if keep not in ("start", "center"):
        raise ValueError(f"keep must be 'start' or 'center', got {keep!r}")
    if n <= budget:
        return 0, n
    lo = 0 if keep == "start" else (n - budget) // 2
    return lo, lo + budget


def _slide_to(lo: int, hi: int, span: tuple[int, int]) -> tuple[int, int]:
    """Shift [lo, hi) by the fewest tokens that make it contain ``span``; start at it if too long."""
    a, b = span
    if b - a > hi - lo:
        return a, a + (hi - lo)
    shift = min(0, a - lo) + max(0, b - hi)
    return lo + shift, hi + shift


def _budget(example: SquadExample, budget: int, max_length: int, what: str) -> int:
    if budget < 1:
        raise ValueError(f"question {example.id!r}: max_length {max_length} leaves no room for the context "
                         f"once the question, markers and {what} are counted; raise max_length")
    return budget


def build_train_features(tokenizer: Any, examples: Sequence[SquadExample], max_length: int,
                         fmt: GenFormat = GenFormat(), keep: Keep = "start"
                         ) -> tuple[list[GenFeature], TruncationReport]:
    """Training sequences with answer-only labels (trained answer ``answers[0]``; module doc)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; the answer must end with eos")
    tail = _ids(tokenizer, f" {fmt.answer_marker}")
    feats, report = [], TruncationReport()
    for ex in examples:
        head = _ids(tokenizer, f"{fmt.question_marker} {ex.question} {fmt.context_marker}")
        ans = ex.answers[0]
        answer = _ids(tokenizer, f" {ans.text}") + [eos]
        ctx, offsets = _context_tokens(tokenizer, ex.context)
        budget = _budget(ex, max_length - len(head) - len(tail) - len(answer), max_length,
                         f"answer ({len(answer)} tokens with eos)")
        span = _token_span(offsets, ans.answer_start, ans.answer_end)
        lo, hi = _window(len(ctx), budget, keep)
        if len(ctx) > budget:
            lo, hi = _slide_to(lo, hi, span)
        inside = lo <= span[0] and span[1] <= hi
        prompt = head + ctx[lo:hi] + tail
        feats.append(GenFeature(ex.id, prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, len(prompt),
                                hi - lo < len(ctx), inside))
        report.total += 1
        report.context_truncated += hi - lo < len(ctx)
        report.answer_cut += not inside
    return feats, report


def build_eval_prompts(tokenizer: Any, examples: Sequence[SquadExample], max_length: int,
                       max_new_tokens: int = 32, fmt: GenFormat = GenFormat(), keep: Keep = "start"
                       ) -> tuple[list[GenFeature], TruncationReport]:
    """Prompts ending with the answer marker, leaving ``max_new_tokens`` of ``max_length`` to generate;
    the report counts questions none of whose gold answers survived the truncation."""
    tail = _ids(tokenizer, f" {fmt.answer_marker}")
    feats, report = [], TruncationReport()
    for ex in examples:
        head = _ids(tokenizer, f"{fmt.question_marker} {ex.question} {fmt.context_marker}")
        ctx, offsets = _context_tokens(tokenizer, ex.context)
        budget = _budget(ex, max_length - len(head) - len(tail) - max_new_tokens, max_length,
                         f"max_new_tokens={max_new_tokens}")
        lo, hi = _window(len(ctx), budget, keep)
        spans = [_token_span(offsets, a.answer_start, a.answer_end) for a in ex.answers]
        inside = any(lo <= a and b <= hi for a, b in spans)
        prompt = head + ctx[lo:hi] + tail
        feats.append(GenFeature(ex.id, prompt, None, len(prompt), hi - lo < len(ctx), inside))
        report.total += 1
        report.context_truncated += hi - lo < len(ctx)
        report.answer_cut += not inside
    return feats, report


def collate(features: Sequence[GenFeature], pad_token_id: int, side: Literal["right", "left"] = "right"
            ) -> dict[str, torch.Tensor]:
    """Pad to the longest: ``input_ids`` with ``pad_token_id``, ``labels`` with -100 (when present),
    ``attention_mask`` 0 on padding. Left padding is for batched generation."""
    width = max(len(f.input_ids) for f in features)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
    has_labels = all(f.labels is not None for f in features)
    if has_labels:
        out["labels"] = []
    for f in features:
        n_pad = width - len(f.input_ids)

        def pad(row: list[int], value: int) -> list[int]:
            return row + [value] * n_pad if side == "right" else [value] * n_pad + row

        out["input_ids"].append(pad(f.input_ids, pad_token_id))
        out["attention_mask"].append(pad([1] * len(f.input_ids), 0))
        if has_labels:
            out["labels"].append(pad(f.labels, IGNORE_INDEX))  # type: ignore[arg-type]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def extract_answer(continuation: str, fmt: GenFormat = GenFormat(), eos_token: str | None = None) -> str:
    """The short answer in generated text: cut at the first eos string, newline or marker, then strip."""
    stops = [m for m in (*fmt.markers, "\n", eos_token) if m]
    cut = min([i for i in (continuation.find(s) for s in stops) if i != -1], default=len(continuation))
    return continuation[:cut].strip()


def decode_answer(tokenizer: Any, generated_ids: Sequence[int], fmt: GenFormat = GenFormat()) -> str:
    """Decode the generated continuation (ids after the prompt) up to its first eos id, then
    :func:`extract_answer` (which also stops at a newline or marker)."""
    ids = list(generated_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return extract_answer(text, fmt, tokenizer.eos_token)
