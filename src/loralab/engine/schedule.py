"""Learning-rate schedules: linear warmup from 0 to the peak, then linear / cosine decay to 0, or constant.

    warmup:   lr(t) = peak * t / W                       for t < W
    linear:   lr(t) = peak * (T - t) / (T - W)           for t >= W
    cosine:   lr(t) = peak * 0.5 * (1 + cos(pi * (t - W) / (T - W)))
    constant: lr(t) = peak
"""

from __future__ import annotations

import math
from typing import Any

import torch


def warmup_steps_for(cfg: Any, total_steps: int) -> int:
    """``warmup_steps`` wins when > 0; otherwise ``ceil(warmup_ratio * total_steps)``."""
    if getattr(cfg, "warmup_steps", 0) > 0:
        return int(cfg.warmup_steps)
    return math.ceil(getattr(cfg, "warmup_ratio", 0.0) * total_steps)


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}: use linear, cosine or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int):
    lr_factor(warmup, schedule, warmup, total)  # validate the name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule, warmup, total))
