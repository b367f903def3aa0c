"""Batches and the loss of instruction tuning: dynamic padding, packed rows, assistant-token loss.

``token_loss_sum`` is ``sum_t -log p(y_t | y_<t)`` over positions whose (shifted) label is not -100;
the task loss is that sum divided by the number of such tokens (a token-weighted mean, so long and
short answers weigh per token, not per example). Packed rows (``segment_ids``) get a block-diagonal
causal mask so packed examples never attend to each other (see :mod:`loralab.tasks.instruct_data`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loralab.engine.task import Batch, TaskSpec
from loralab.tasks.instruct_data import IGNORE

def make_collate(pad_id: int):
    def collate(examples: list[dict]) -> Batch:
        width = max(len(ex["input_ids"]) for ex in examples)

        def pad(key: str, value: int, default=None) -> torch.Tensor:
            rows = [list(ex[key] if key in ex else default(ex)) for ex in examples]
            return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        batch = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE),
                 "attention_mask": pad("attention_mask", 0, lambda ex: [1] * len(ex["input_ids"]))}
        if any("segment_ids" in ex for ex in examples):
            batch["segment_ids"] = pad("segment_ids", -1, lambda ex: [0] * len(ex["input_ids"]))
            batch["position_ids"] = pad("position_ids", 0, lambda ex: range(len(ex["input_ids"])))
        return batch

    return collate


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) segment ids (-1 = padding) -> additive (B, 1, L, L) mask: query i sees key j iff
    j <= i and seg[i] == seg[j] (padding queries see themselves, keeping softmax finite)."""
    n = segment_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed |= torch.eye(n, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    if "segment_ids" in batch:
        mask = block_causal_mask(batch["segment_ids"], _model_dtype(model))
        return model(input_ids=batch["input_ids"], attention_mask=mask,
                     position_ids=batch["position_ids"]).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def token_loss_sum(model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum over trained tokens of -log p(label | prefix), number of trained tokens); labels shift by one."""
    logits = forward_logits(model, batch)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum", label_smoothing=label_smoothing)
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: Sequence[dict], collate, batch_size: int = 8,
                 bar: Any = None) -> dict[str, float]:
    """Token-weighted mean assistant-token loss and perplexity exp(loss) over ``examples`` (``bar``: an
    optional progress bar, advanced once per batch)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(examples[start: start + batch_size])).items()}
        loss, n = token_loss_sum(model, batch)
        total, count = total + float(loss), count + n
        if bar is not None:
            bar.update(1)
    model.train(was_training)
    if count == 0:
        raise ValueError("no held-out tokens to score (all labels are -100)")
    mean = total / count
    return {"eval_loss": mean, "eval_ppl": float(torch.tensor(mean).exp()), "eval_tokens": float(count)}


def make_task(train: list[dict], heldout: list[dict], pad_id: int, eval_batch_size: int = 8) -> TaskSpec:
    collate = make_collate(pad_id)
    spec: TaskSpec

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        total, n = token_loss_sum(model, batch, spec.label_smoothing)
        return total / max(n, 1)

    spec = TaskSpec(train_dataset=train, collate=collate, loss=loss,
                    evaluate=(lambda model: heldout_loss(model, heldout, collate, eval_batch_size)) if heldout
                    else None,
                    metric="eval_loss" if heldout else None, greater_is_better=False,
                    tokens=lambda batch: int(batch["attention_mask"].sum()))
    return spec
