"""Compute precision: which dtype the frozen weights and the activations use, and how a model is set to it.

bf16 compute (``model.compute_dtype: bfloat16``, or ``auto`` on hardware with fast bf16 matmuls):

* frozen floating-point parameters are stored in bfloat16 (the base weights, norms, embeddings);
* trainable parameters stay float32 (LoRA's A and B, heads, biases, adapters), and so do their gradients
  and the optimizer state -- the LoRA node rounds A, B to bf16 per call (lora_fused.py);
* buffers are left alone (rotary inverse frequencies, BatchNorm statistics stay float32);
* forward passes run under ``torch.autocast(bfloat16)`` (``compute_context``), so a float32 trainable
  module meeting bf16 activations (a classifier head, a LayerNorm of an adapter) computes in bf16
  instead of failing; the loss and the softmax of the cross-entropy run in float32 (linear_ce.py).

``auto`` picks bf16 on a CPU with AVX512-BF16 or AMX (torch's own checks, which its kernels also use) and
on a CUDA GPU that supports bf16, float32 elsewhere; the reason is returned so a run can record it.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

ComputeName = Literal["auto", "float32", "bfloat16"]
HALF = (torch.bfloat16, torch.float16)


def fast_bf16(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(does this device multiply bf16 faster than fp32, why we think so)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    if device.type != "cpu":
        return False, f"no bf16 rule for device type {device.type!r}"
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    avx = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    if amx or avx:
        return True, f"CPU has {' and '.join(n for n, on in (('AMX', amx), ('AVX512-BF16', avx)) if on)}"
    return False, "CPU has neither AMX nor AVX512-BF16 (bf16 matmuls would be emulated, slower than fp32)"


def resolve_compute_dtype(name: ComputeName | str, device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """The dtype for ``model.compute_dtype`` = ``name`` on ``device``, and the reason it was chosen."""
    if name == "float32":
        return torch.float32, "set: float32"
    if name == "bfloat16":
        return torch.bfloat16, "set: bfloat16"
    if name != "auto":
        raise ValueError(f"compute_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    ok, why = fast_bf16(device)
    return (torch.bfloat16 if ok else torch.float32), f"auto: {why}"


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Store frozen floating-point parameters in ``dtype`` and trainable ones in float32 (in place).

    Returns the number of parameters (elements) cast each way. float64 parameters are left as they are
    (a float64 model is a reference computation, not a speed setting). A normalisation layer with a
    trainable parameter (BitFit's LayerNorm bias) keeps its frozen ones in float32 too: autocast does not
    cast layer_norm's weight and bias, which must share one dtype (its input may still be bf16)."""
    counts = {"frozen_cast": 0, "trainable_float32": 0}
    keep = {id(p) for m in model.modules() if type(m).__name__.endswith("Norm")
            and any(q.requires_grad for q in m.parameters(recurse=False)) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        if not p.is_floating_point() or p.dtype == torch.float64:
            continue
        if (p.requires_grad or id(p) in keep) and p.dtype != torch.float32:
            p.data = p.data.float()
            counts["trainable_float32"] += p.numel()
        elif not p.requires_grad and id(p) not in keep and p.dtype != dtype:
            p.data = p.data.to(dtype)
            counts["frozen_cast"] += p.numel()
    return counts


def compute_context(dtype: torch.dtype, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """autocast to ``dtype`` for a 16-bit compute dtype; nothing for float32."""
    device = torch.device(device)
    if dtype in HALF:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()
