"""Where the bytes of a (Q)LoRA training setup go: a memory report by role and storage format.

Each tensor is counted once (``numel * element_size``; shared storage, e.g. tied embeddings, is
deduplicated) under one role:

- ``frozen base``  -- parameters with requires_grad=False and all buffers, by format: fp32 / bf16 /
  fp16 ..., ``4-bit packed`` (the uint8 weight of a 4-bit layer: two 4-bit codes per byte) and
  ``quant state`` (that layer's other tensors: absmax, quant map, nested/double-quant absmax ...).
  A 4-bit layer is any module with a ``dequantize()`` method whose ``weight`` is uint8 (loralab's
  Linear4bit, whose buffers are weight + absmax, quant_map, nested_absmax, nested_quant_map, offset);
  bitsandbytes ``Params4bit`` are recognised too (their ``quant_state`` object holds the rest).
- ``trainable``    -- parameters with requires_grad=True (LoRA A/B, modules_to_save, ...).
- ``gradients``    -- every ``param.grad`` present.
- ``optimizer``    -- every tensor in ``optimizer.state`` (fp32 moments, 8-bit codes + absmax, steps).

Meta tensors (no storage) count zero. Activations are not tensors the model owns and are not counted;
measure them with a peak-memory tool.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["MemoryReport", "memory_report", "ROLES"]

ROLES = ("frozen base", "trainable", "gradients", "optimizer")
_FORMAT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.float64: "fp64", torch.uint8: "uint8", torch.int8: "int8",
                 torch.int64: "int64", torch.int32: "int32"}
PACKED_4BIT = "4-bit packed"
QUANT_STATE = "quant state"


def _format(t: torch.Tensor) -> str:
    return _FORMAT_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))


def _nbytes(t: torch.Tensor) -> int:
    return 0 if t.is_meta else t.numel() * t.element_size()


@dataclass
class MemoryReport:
    """Bytes by (role, format). ``str(report)`` is an aligned table in MB (1 MB = 2**20 bytes)."""

    bytes_by: dict[tuple[str, str], int] = field(default_factory=dict)

    def role_bytes(self, role: str) -> int:
        if role not in ROLES:
            raise KeyError(f"unknown role {role!r}; roles are {ROLES}")
        return sum(b for (r, _), b in self.bytes_by.items() if r == role)

    def format_bytes(self, role: str, fmt: str) -> int:
        return self.bytes_by.get((role, fmt), 0)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by.values())

    def as_dict(self) -> dict[str, Any]:
        return {"by_role_and_format": {f"{r}/{f}": b for (r, f), b in sorted(self.bytes_by.items())},
                "by_role": {r: self.role_bytes(r) for r in ROLES}, "total": self.total_bytes}

    def __str__(self) -> str:
        rows = [(r, f, b) for r in ROLES for (rr, f), b in sorted(self.bytes_by.items()) if rr == r]
        rows.append(("total", "", self.total_bytes))
        w_role = max(len(r) for r, _, _ in rows + [("role", "", 0)])
        w_fmt = max(len(f) for _, f, _ in rows + [("", "format", 0)])
        lines = [f"{'role':<{w_role}}  {'format':<{w_fmt}}  {'MB':>10}"]
        for i, (r, f, b) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(lines[0]))
            lines.append(f"{r:<{w_role}}  {f:<{w_fmt}}  {b / 2**20:>10.3f}")
        return "\n".join(lines)


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Tensors inside nested dicts/lists/tuples or objects with tensor attributes (quant states)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)
    elif value is not None and hasattr(value, "__dict__") and not isinstance(value, nn.Module):
        for v in vars(value).values():
            yield from _tensors_in(v)


def _is_4bit_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return callable(getattr(module, "dequantize", None)) and torch.is_tensor(weight) \
        and weight.dtype == torch.uint8


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count every tensor the model and optimizer own, once, by role and format (module docstring)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    seen: set[tuple[Any, ...]] = set()

    def add(role: str, fmt: str, t: torch.Tensor) -> None:
        key = (t.device, t.data_ptr(), _nbytes(t)) if not t.is_meta and t.data_ptr() else ("id", id(t))
        if key in seen:
            return
        seen.add(key)
        counts[(role, fmt)] += _nbytes(t)

    for module in model.modules():
        four_bit = _is_4bit_layer(module)
        local = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in local:
            if t is None:
                continue
            if isinstance(t, nn.Parameter) and t.requires_grad:
                add("trainable", _format(t), t)
                continue
            bnb_state = getattr(t, "quant_state", None)
            if bnb_state is not None:  # bitsandbytes Params4bit: packed data + quant_state object
                add("frozen base", PACKED_4BIT, t)
                for extra in _tensors_in(bnb_state):
                    add("frozen base", QUANT_STATE, extra)
            elif four_bit and name != "bias":
                add("frozen base", PACKED_4BIT if name == "weight" else QUANT_STATE, t)
            else:
                add("frozen base", _format(t), t)
    for p in model.parameters():
        if p.grad is not None:
            add("gradients", _format(p.grad), p.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in _tensors_in(state):
                add("optimizer", _format(t), t)
    return MemoryReport(dict(counts))
