"""Encoder span extraction for SQuAD: sliding-window features, the start/end loss, best-span search.

    feats = make_span_features(tokenizer, examples, max_length=384, doc_stride=128)
    loss = span_loss(start_logits, end_logits, batch["start_positions"], batch["end_positions"])
    answers = best_spans(feats, all_start_logits, all_end_logits, examples)   # {id: answer text}

Windows: each example is tokenized as ``[CLS] question [SEP] context [SEP]`` (the tokenizer's own
specials) with ``truncation="only_second"``; a context longer than one window continues in further
windows, consecutive windows sharing ``doc_stride`` context tokens (the tokenizer's ``stride``, as in
Hugging Face's ``run_qa.py``; the step between window starts is ``capacity - doc_stride`` context tokens,
``capacity = max_length - len(question tokens) - specials``).

Labels: the trained answer is ``answers[0]`` at characters ``[s, e)``. A window *contains* it when its
first context token starts at or before ``s`` and its last ends at or after ``e``; then
``start = first context token with offset_end > s`` and ``end = last context token with
offset_start < e`` (the tokens overlapping the answer). Other windows, including those that cut the
answer, point both positions at index 0 (CLS).

Loss: ``L = (CE(start_logits, start) + CE(end_logits, end)) / 2`` with
``CE(z, y) = -(1/N) sum_i log softmax(z_i)[y_i]``.

Best span of an example, over all its windows: candidate starts are the ``n_best`` context tokens
with the largest start logit, likewise ends; a pair (i, j) is valid when ``i <= j``,
``j - i + 1 <= max_answer_length`` and both lie in the context; its score is ``start[i] + end[j]``;
the answer is ``context[offset_start(i) : offset_end(j)]`` of the best valid pair ("" when none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from loralab.tasks.squad.data import SquadExample

Offset = tuple[int, int]


@dataclass
class SpanFeatures:
    """One row per window. ``offsets[f][t]`` is the character span in the context of token ``t``, or
    None for question, special and padding tokens. Positions are 0 (CLS) where the window lacks the
    answer, and absent (empty lists) when built without labels."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    token_type_ids: list[list[int]] | None
    offsets: list[list[Offset | None]]
    example_index: list[int]
    example_ids: list[str]
    start_positions: list[int] = field(default_factory=list)
    end_positions: list[int] = field(default_factory=list)
    answers_outside: int = 0       # labelled examples whose answer lies in no window (trained as CLS)
    questions_truncated: int = 0   # questions cut to max_query_length tokens

    def __len__(self) -> int:
        return len(self.input_ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model inputs (and positions when labelled) as int64 tensors, one row per window."""
        out = {"input_ids": torch.tensor(self.input_ids), "attention_mask": torch.tensor(self.attention_mask)}
        if self.token_type_ids is not None:
            out["token_type_ids"] = torch.tensor(self.token_type_ids)
        if self.start_positions:
            out["start_positions"] = torch.tensor(self.start_positions)
            out["end_positions"] = torch.tensor(self.end_positions)
        return out


def _cut_questions(tokenizer: Any, questions: list[str], max_query_length: int) -> tuple[list[str], int]:
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out, cut = [], 0
    for q, offs in zip(questions, enc["offset_mapping"]):
        if len(offs) > max_query_length:
            q, cut = q[:offs[max_query_length - 1][1]], cut + 1
        out.append(q)
    return out, cut


def answer_token_span(offsets: Sequence[Offset | None], start_char: int, end_char: int) -> tuple[int, int]:
    """(start, end) token indices of characters ``[start_char, end_char)`` in one window, or (0, 0)
    when the window's context does not contain the whole span (see the module doc)."""
    ctx = [t for t, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return 0, 0
    start = next(t for t in ctx if offsets[t][1] > start_char)
    end = max(t for t in ctx if offsets[t][0] < end_char)
    return (start, end) if start <= end else (0, 0)


def make_span_features(tokenizer: Any, examples: Sequence[SquadExample], max_length: int = 384,
                       doc_stride: int = 128, max_query_length: int = 64,
                       with_labels: bool = True) -> SpanFeatures:
    """Sliding-window features of ``examples`` for a fast (offset-giving) encoder tokenizer.

    Every window is padded to ``max_length``. ``with_labels`` adds start/end positions of
    ``answers[0]`` (see the module doc) and counts answers that fit in no window.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("span features need a fast tokenizer (offset mappings); load it with use_fast=True")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError("span features need right padding (CLS at index 0); set tokenizer.padding_side = 'right'")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    capacity = max_length - max_query_length - specials
    if not 0 <= doc_stride < capacity:
        raise ValueError(f"doc_stride must be in [0, {capacity}) so that windows advance: max_length "
                         f"{max_length} - max_query_length {max_query_length} - {specials} specials leaves "
                         f"{capacity} context tokens; got doc_stride={doc_stride}")
    if not examples:
        raise ValueError("no examples")
    if with_labels and not all(ex.answers for ex in examples):
        raise ValueError("with_labels=True needs every example to have an answer (answers[0] is trained on)")
    questions, n_cut = _cut_questions(tokenizer, [ex.question.lstrip() for ex in examples], max_query_length)
    enc = tokenizer(questions, [ex.context for ex in examples], truncation="only_second", max_length=max_length,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length")
    feats = SpanFeatures(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         token_type_ids=enc.get("token_type_ids"), offsets=[],
                         example_index=list(enc["overflow_to_sample_mapping"]), example_ids=[],
                         questions_truncated=n_cut)
    found = [False] * len(examples)
    for f, k in enumerate(feats.example_index):
        seq = enc.sequence_ids(f)
        if seq[0] is not None:
            raise ValueError("the tokenizer does not start each window with a special (CLS) token")
        offs = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][f], seq)]
        feats.offsets.append(offs)
        feats.example_ids.append(examples[k].id)
        if with_labels:
            ans = examples[k].answers[0]
            start, end = answer_token_span(offs, ans.answer_start, ans.answer_end)
            found[k] = found[k] or start > 0
            feats.start_positions.append(start)
            feats.end_positions.append(end)
    if with_labels:
        feats.answers_outside = found.count(False)
    return feats


def span_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
              end_positions: torch.Tensor) -> torch.Tensor:
    """``(CE(start_logits, start_positions) + CE(end_logits, end_positions)) / 2``, logits ``(N, T)``.

    Positions outside ``[0, T)`` raise (no silent clamping or ignoring)."""
    n_tok = start_logits.shape[-1]
    for name, pos in (("start_positions", start_positions), ("end_positions", end_positions)):
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= n_tok):
            raise ValueError(f"{name} must lie in [0, {n_tok}), got [{int(pos.min())}, {int(pos.max())}]")
    ce = torch.nn.functional.cross_entropy
    return (ce(start_logits.float(), start_positions) + ce(end_logits.float(), end_positions)) / 2


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def best_window_span(start: np.ndarray, end: np.ndarray, offsets: Sequence[Offset | None], n_best: int = 20,
                     max_answer_length: int = 30) -> tuple[float, int, int] | None:
    """(score, start token, end token) of the best valid span of one window, or None (module doc)."""
    if not len(start) == len(end) == len(offsets):
        raise ValueError(f"window logits ({len(start)}, {len(end)}) and offsets ({len(offsets)}) differ in length")
    ctx = np.array([o is not None for o in offsets])
    if not ctx.any():
        return None
    starts = np.where(ctx, start, -np.inf)
    ends = np.where(ctx, end, -np.inf)
    k = min(n_best, int(ctx.sum()))
    best: tuple[float, int, int] | None = None
    for i in np.argsort(-starts, kind="stable")[:k]:
        for j in np.argsort(-ends, kind="stable")[:k]:
            if i <= j < i + max_answer_length:
                score = float(start[i] + end[j])
                if best is None or score > best[0]:
                    best = (score, int(i), int(j))
    return best


def best_spans(features: SpanFeatures, start_logits: Any, end_logits: Any, examples: Sequence[SquadExample],
               n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """The best answer text of every example over all its windows (logits: ``(windows, T)``)."""
    starts, ends = _as_array(start_logits), _as_array(end_logits)
    if starts.shape != ends.shape or starts.ndim != 2 or len(starts) != len(features):
        raise ValueError(f"logits must be (windows={len(features)}, T) each, got {starts.shape} and {ends.shape}")
    missing = set(range(len(examples))) - set(features.example_index)
    if missing:
        raise ValueError(f"{len(missing)} example(s) have no window, e.g. {examples[min(missing)].id!r}: "
                         "pass the examples the features were built from")
    best: dict[int, tuple[float, int, int, int]] = {}
    for f, k in enumerate(features.example_index):
        if k >= len(examples) or features.example_ids[f] != examples[k].id:
            raise ValueError(f"window {f} belongs to {features.example_ids[f]!r} (example {k}), which is "
                             "not in examples at that index: pass the examples the features were built from")
        cand = best_window_span(starts[f], ends[f], features.offsets[f], n_best, max_answer_length)
        if cand is not None and (k not in best or cand[0] > best[k][0]):
            best[k] = (*cand, f)
    out: dict[str, str] = {}
    for k, ex in enumerate(examples):
        if k in best:
            _, i, j, f = best[k]
            out[ex.id] = ex.context[features.offsets[f][i][0]:features.offsets[f][j][1]]
        else:
            out[ex.id] = ""  # no valid span in any window (scores 0 unless a gold normalises to "")
    return out
