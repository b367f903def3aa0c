"""One padding collate: examples of token lists -> right-padded tensors, padded to the batch's longest.

Per key the pad value is ``input_ids``: the tokenizer's pad id, ``labels``: -100 (ignored by the
loss), ``segment_ids``: -1 (packed rows: padding belongs to no example), anything else 0. A key an
example lacks gets its default (``attention_mask``: ones; ``segment_ids``: zeros; ``position_ids``:
0..n-1). Scalar fields (a class label, a regression target) become one tensor of ``label_dtype``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

IGNORE = -100
_DEFAULTS: dict[str, Callable[[int], list[int]]] = {
    "attention_mask": lambda n: [1] * n, "segment_ids": lambda n: [0] * n, "position_ids": lambda n: list(range(n)),
}


def make_collate(pad_id: int, label_dtype: torch.dtype = torch.long,
                 always: tuple[str, ...] = ("attention_mask",)) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A collate for ``pad_id``; the keys in ``always`` are created (from their defaults) when absent."""
    pads = {"input_ids": pad_id, "labels": IGNORE, "segment_ids": -1}

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in examples)
        keys = list(dict.fromkeys([k for ex in examples for k in ex] + list(always)))
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            first = next((ex[key] for ex in examples if key in ex), None)
            if first is not None and not isinstance(first, (list, tuple)):
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=label_dtype)
                continue
            rows = [list(ex[key]) if key in ex else _DEFAULTS[key](len(ex["input_ids"])) for ex in examples]
            value = pads.get(key, 0)
            batch[key] = torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
        return batch

    return collate
