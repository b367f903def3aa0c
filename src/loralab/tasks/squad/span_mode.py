"""Span-extraction SQuAD on an encoder: sliding windows, a start/end head (``qa_outputs``) trained and saved
with the adapter, the best span over every window of a question (the span experiment mode)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from loralab.engine.experiment import Built
from loralab.engine.task import TaskSpec
from loralab.engine.typed_config import ConfigError
from loralab.tasks.common.batches import make_collate
from loralab.tasks.common.setup import apply_method
from loralab.tasks.squad.data import SquadExample
from loralab.tasks.squad.generative import TruncationReport
from loralab.tasks.squad.span import answer_token_span, best_spans, make_span_features, span_loss

SPAN_HEAD = "qa_outputs"


def _log(msg: str) -> None:
    print(f"[squad] {msg}", file=sys.stderr, flush=True)


def _windows(features: Any, with_labels: bool) -> list[dict]:
    """One dict per window without its padding (the collate pads each batch to its longest window)."""
    out = []
    for f, ids in enumerate(features.input_ids):
        n = sum(features.attention_mask[f])
        row = {"input_ids": ids[:n], "attention_mask": features.attention_mask[f][:n]}
        if features.token_type_ids is not None:
            row["token_type_ids"] = features.token_type_ids[f][:n]
        if with_labels:
            row["start_positions"], row["end_positions"] = features.start_positions[f], features.end_positions[f]
        out.append(row)
    return out


def eval_windows_cut(features: Any, examples: list[SquadExample]) -> TruncationReport:
    """Questions none of whose gold answers lies whole in one of their windows (they cannot be answered)."""
    held = [False] * len(examples)
    for f, k in enumerate(features.example_index):
        if not held[k]:
            held[k] = any(answer_token_span(features.offsets[f], a.answer_start, a.answer_end)[0] > 0
                          for a in examples[k].answers)
    windows = _window_counts(features, len(examples))
    return TruncationReport(total=len(examples), context_truncated=sum(w > 1 for w in windows),
                            answer_cut=held.count(False))


def _window_counts(features: Any, n: int) -> list[int]:
    counts = [0] * n
    for k in features.example_index:
        counts[k] += 1
    return counts


def _span_forward(model: nn.Module, batch: dict) -> Any:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return model(**{k: batch[k] for k in keys if k in batch})


@torch.no_grad()
def window_logits(model: nn.Module, windows: list[dict], collate: Callable, width: int,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits of every window, ``(windows, width)``; positions past a window's end are -inf."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    starts = torch.full((len(windows), width), float("-inf"))
    ends = starts.clone()
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]["input_ids"]))
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = {k: v.to(device) for k, v in collate([windows[i] for i in idx]).items()}
            out = _span_forward(model, batch)
            for row, i in enumerate(idx):
                n = len(windows[i]["input_ids"])
                starts[i, :n] = out.start_logits[row, :n].float().cpu()
                ends[i, :n] = out.end_logits[row, :n].float().cpu()
    finally:
        model.train(was_training)
    return starts, ends


def build_span(cfg: Any, train: list[SquadExample], evaluation: list[SquadExample]) -> Built:
    from loralab.models.zoo import load_from_config, load_tokenizer

    data = cfg.data
    if cfg.train.label_smoothing:
        raise ConfigError(f"train.label_smoothing={cfg.train.label_smoothing}: the span loss has no label "
                          "smoothing; set train.label_smoothing=0 (or use data.mode=generative)")
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    try:
        train_f = make_span_features(tokenizer, train, data.max_length, data.doc_stride, data.max_query_length)
        eval_f = make_span_features(tokenizer, evaluation, data.max_length, data.doc_stride, data.max_query_length)
    except ValueError as err:
        raise ConfigError(f"data.doc_stride / data.max_length / data.max_query_length: {err}") from None
    torch.manual_seed(cfg.train.seed)  # the fresh qa_outputs head and the LoRA A init depend on it
    model, _ = load_from_config(cfg.model, kind="qa")
    heads = list(cfg.lora.modules_to_save or [SPAN_HEAD])
    info = apply_method(model, cfg.lora, "QUESTION_ANS", heads, cfg.model.name)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = make_collate(pad)
    eval_rows = _windows(eval_f, with_labels=False)
    eval_batch = max(32, cfg.train.batch_size)

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:
        out = _span_forward(m, batch)
        return span_loss(out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"])

    spec = TaskSpec(train_dataset=_windows(train_f, with_labels=True), collate=collate, loss=loss,
                    evaluate=None, metric=None)

    def predict(m: nn.Module) -> dict[str, str]:
        starts, ends = window_logits(m, eval_rows, collate, data.max_length, eval_batch)
        return best_spans(eval_f, starts, ends, evaluation, data.n_best, data.max_answer_length)

    train_cut = TruncationReport(total=len(train), answer_cut=train_f.answers_outside,
                                 context_truncated=sum(n > 1 for n in _window_counts(train_f, len(train))))
    eval_cut = eval_windows_cut(eval_f, evaluation)
    details = {"truncation": {"train": train_cut.as_dict(), "eval": eval_cut.as_dict()},
               "train_windows": len(train_f), "eval_windows": len(eval_f),
               "questions_truncated": {"train": train_f.questions_truncated, "eval": eval_f.questions_truncated}}
    _log(f"span: {len(train)} training questions in {len(train_f)} windows ({train_f.answers_outside} answers in "
         f"no window), {len(evaluation)} evaluation questions in {len(eval_f)} windows ({eval_cut.answer_cut} cut)")
    return Built(model, spec, {"predict": predict, "details": details, "method": info, "tokenizer": tokenizer})


# ---------------------------------------------------------------- the experiment


