"""What a task hands the engine. The training loop knows nothing else about the task.

A task (GLUE, E2E, instruction tuning, ...) supplies tokenized examples, a collate function that
pads them dynamically, a loss, and an evaluation. The engine supplies everything generic:
optimizer, schedule, accumulation, clipping, checkpoints, resume, logging, early stopping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class TaskSpec:
    train_dataset: Sequence[dict[str, Any]]
    """Tokenized training examples (e.g. {"input_ids": [...], "labels": ...}); indexable, sized."""
    collate: Callable[[list[dict[str, Any]]], Batch]
    """Turns a list of examples into a padded batch (pad to the longest in the batch, not to max_length)."""
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    """Mean loss of one batch (a scalar). Label smoothing, masking etc. are the task's business; the
    engine passes its ``label_smoothing`` setting through ``TaskSpec.label_smoothing`` below."""
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    """Returns metrics on held-out data, e.g. {"accuracy": 0.91, "eval_loss": 0.3}."""
    metric: str | None = None
    """Key of ``evaluate``'s result used for keep-best and early stopping (None: no selection)."""
    greater_is_better: bool = True
    length: Callable[[dict[str, Any]], int] | None = None
    """Length of one example, for length-grouped batching; default len(example["input_ids"])."""
    tokens: Callable[[Batch], int] | None = None
    """Number of real tokens in a batch, for tokens/s; default attention_mask.sum()."""
    label_smoothing: float = 0.0
    """Set by the engine from the train config before training; a task's loss may read it."""

    def example_length(self, example: dict[str, Any]) -> int:
        return self.length(example) if self.length else len(example["input_ids"])

    def batch_tokens(self, batch: Batch) -> int:
        if self.tokens:
            return int(self.tokens(batch))
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel()) if "input_ids" in batch else 0
