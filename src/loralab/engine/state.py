"""What a training run is at any moment (``TrainState``, checkpointed) and what it ends as (``FitResult``).

Divergence rule: a step's loss is *high* when it is non-finite or above ``DIVERGENCE_FACTOR`` times the
run's first finite loss (when that is > 0). ``DIVERGENCE_STEPS`` high steps in a row mark the run
diverged: the trainer warns loudly and ``FitResult.diverged`` is true. Training goes on (whether to stop
is the user's call); a spike that recovers resets the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

DIVERGENCE_FACTOR = 10.0
DIVERGENCE_STEPS = 5


@dataclass
class TrainState:
    """What the loop changes as it trains, besides weights, optimizer, scheduler and RNG. A checkpoint
    stores it, so everything ``fit`` needs at the end (the history included) survives a resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_evals: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_tokens: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0
    first_loss: float | None = None  # the divergence rule's reference
    high_loss_steps: int = 0
    diverged: bool = False

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain values for state.pt (``best_weights`` are saved beside it as safetensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "best_weights"}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "TrainState":
        """From ``load_checkpoint``'s state (other keys, e.g. the optimizer's, are ignored)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def position(self) -> tuple[int, int, int, int]:
        """Where the run is: equal positions mean an identical checkpoint."""
        return self.step, self.epoch, self.batch_in_epoch, len(self.history)

    def record_evaluation(self, metrics: dict[str, float], metric: str | None, greater_is_better: bool) -> bool:
        """Append to the history, update best and bad_evals; True when this evaluation is the new best."""
        self.history.append({"step": self.step, **metrics})
        if metric is None:
            return False
        if metric not in metrics:
            raise KeyError(f"task metric {metric!r} not in evaluate() result {sorted(metrics)}")
        value, best = metrics[metric], self.best_metric
        if best is None or (value > best if greater_is_better else value < best):
            self.best_metric, self.best_step, self.bad_evals = value, self.step, 0
            return True
        self.bad_evals += 1
        return False

    def observe_loss(self, loss: float) -> bool:
        """Apply the divergence rule to one step's loss; True on the step the run is found diverged."""
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        ref = self.first_loss
        high = not math.isfinite(loss) or (ref is not None and ref > 0 and loss > DIVERGENCE_FACTOR * ref)
        self.high_loss_steps = self.high_loss_steps + 1 if high else 0
        if self.high_loss_steps == DIVERGENCE_STEPS:
            self.diverged = True
            return True
        return False


@dataclass
class FitResult:
    status: str = "completed"  # completed | early_stopped | interrupted
    global_step: int = 0
    epochs: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_tokens: int = 0
    skipped_steps: int = 0
    diverged: bool = False  # by the divergence rule above: this run's results are not to be trusted

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "history"}
        d["tokens_per_second"] = self.tokens_per_second
        return d
