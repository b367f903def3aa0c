"""Subsampling with one RNG: every experiment's ``data.train_samples`` picks its examples the same way."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def subsample(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """``n`` items drawn without replacement by ``random.Random(seed)``, kept in their original order
    (all of them, in order, when ``n`` is 0/None or not below ``len(items)``)."""
    if not n or n <= 0 or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]
