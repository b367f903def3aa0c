"""Linear4bit: a frozen linear layer stored in 4 bits (QLoRA's base), model conversion and merges.

Forward: ``y = x @ dequantize(W4).T + b`` in ``compute_dtype``. The dequantized weight lives only
inside one forward / backward call: the autograd function keeps a reference to the module, not the
(out x in) matrix, and rebuilds it in backward (``dx = dy @ W``). There is no weight gradient: the base
is frozen; LoRA (``LoraLinear(Linear4bit)``) trains A and B on top.

State dicts use bitsandbytes' serialized layout (bnb_format.py) so checkpoints interoperate with
transformers + bitsandbytes ("*-bnb-4bit" repos); a layer built from a state validates it first
(quant_state.validate_state), so a corrupt file fails at load, naming the tensor.

Model-level tools below: quantize_model (in place, validated first), the merges
merge_to_full_precision / merge_and_requantize / merge_model, and cached_dequantize. Checkpoint I/O
(save_quantized, load_quantized, load_quantized_from_safetensors, load_model_4bit, empty_init) is in
quant_io.py, which builds on this module (never the other way round).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from loralab.core.bnb_format import state_from_bnb_dict, state_to_bnb_dict
from loralab.core.dequant import dequantize_4bit
from loralab.core.quant import quantize_4bit
from loralab.core.quant_state import (QuantState, QuantType, bits_per_param, check_block_size, check_finite_float,
                                      check_packed, codebook, validate_state)
from loralab.core.scratch import scratch

_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")


def _workspace(module: "Linear4bit") -> torch.Tensor:
    """W rebuilt into a per-thread scratch (core/scratch.py) shared by every layer of the same shape:
    a fresh (out x in) tensor per call and per backward would leave allocator holes between activations.
    The scratch is only read inside the one matmul that follows."""
    buf = scratch("rebuilt-weight", (module.out_features, module.in_features), module.compute_dtype,
                  module.weight.device)
    return dequantize_4bit(module.weight, module.quant_state(), module.compute_dtype, out=buf)


class _Dequantized4bitMatmul(torch.autograd.Function):
    """y = x W^T with W rebuilt from 4 bits; backward recomputes W instead of saving it (memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "Linear4bit") -> torch.Tensor:
        ctx.module = module
        ctx.input_dtype = x.dtype
        weight = module.rebuilt_weight()
        return (x.to(weight.dtype) @ weight.T).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = ctx.module.rebuilt_weight()
        return (grad_out.to(weight.dtype) @ weight).to(ctx.input_dtype), None


class Linear4bit(nn.Module):
    """Frozen 4-bit linear layer. Buffers: ``weight`` (packed uint8) and the quant state; bias frozen."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, state: QuantState,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
                 name: str = "Linear4bit.weight") -> None:
        """``name`` (the weight's name in the model) is what errors about a bad ``packed`` / ``state`` say."""
        super().__init__()
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        if tuple(state.shape) != (out_features, in_features):
            raise ValueError(f"{name}: quant state shape {tuple(state.shape)} != (out_features, in_features) "
                             f"= ({out_features}, {in_features})")
        validate_state(state, name)
        check_packed(packed, state, name)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.quant_type, self.block_size, self.weight_dtype = state.quant_type, state.block_size, state.dtype
        self.nested_block_size = state.nested_block_size
        self.register_buffer("weight", packed.reshape(-1, 1))
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code.float())
        nested = state.double_quant
        self.register_buffer("nested_absmax", state.nested_absmax if nested else None)
        self.register_buffer("nested_quant_map", state.nested_code if nested else None)
        self.register_buffer("offset", state.offset.reshape(()).float() if nested else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: QuantType = "nf4", double_quant: bool = True,
                    block_size: int = 64, compute_dtype: torch.dtype = torch.float32,
                    name: str = "linear.weight") -> "Linear4bit":
        """Quantize an nn.Linear's weight (errors name ``name``); the bias is kept in its dtype."""
        packed, state = quantize_4bit(linear.weight.detach(), quant_type, block_size, double_quant, name=name)
        return cls(linear.in_features, linear.out_features, packed, state, linear.bias, compute_dtype, name)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the 4-bit state; a dtype cast (``model.half()``, ``.to(bf16)``) must not
        touch it: absmax / offset / codebooks stay fp32, codes uint8 (only the bias follows)."""
        originals = {k: self._buffers[k] for k in ("weight",) + _STATE_BUFFERS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for key, original in originals.items():
            if self._buffers[key].dtype != original.dtype:
                self._buffers[key] = original.to(self._buffers[key].device)
        return self

    def quant_state(self) -> QuantState:
        state = QuantState(self.quant_type, self.block_size, (self.out_features, self.in_features),
                             self.weight_dtype, self.absmax, self.quant_map)
        if self.nested_absmax is not None:
            state.offset, state.nested_absmax = self.offset, self.nested_absmax
            state.nested_code, state.nested_block_size = self.nested_quant_map, self.nested_block_size
        return state

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in ``dtype`` (default: compute_dtype)."""
        return dequantize_4bit(self.weight, self.quant_state(), dtype or self.compute_dtype)

    def rebuilt_weight(self) -> torch.Tensor:
        """W in compute_dtype for one matmul: the cached copy inside cached_dequantize(), else rebuilt into a
        per-thread scratch that the next layer of the same shape overwrites (read it at once, never keep it)."""
        cached = getattr(self, "_weight_cache", None)
        return cached if cached is not None else _workspace(self)

    def bits_per_param(self) -> float:
        return bits_per_param(self.weight, self.quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Dequantized4bitMatmul.apply(x, self)  # inside cached_dequantize(): the cached W, no rebuild
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, block_size={self.block_size}{dq}, compute_dtype={self.compute_dtype}")

    # -- bitsandbytes serialized format -------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for key, value in state_to_bnb_dict(self.quant_state()).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        name = prefix.rstrip(".") or "Linear4bit"
        entries = {k[len(prefix) + len("weight."):]: v for k, v in state_dict.items()
                   if k.startswith(prefix + "weight.")}
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        try:
            state = state_from_bnb_dict(entries, f"{name}.weight")
            fresh = Linear4bit(self.in_features, self.out_features, state_dict[prefix + "weight"], state,
                               state_dict.get(prefix + "bias"), self.compute_dtype, f"{name}.weight")
        except (ValueError, TypeError) as err:
            error_msgs.append(str(err))
            return
        if (self.bias is None) != (fresh.bias is None):
            error_msgs.append(f"{name}.bias: present in {'module' if self.bias is not None else 'checkpoint'} only")
            return
        self.quant_type, self.block_size, self.weight_dtype = fresh.quant_type, fresh.block_size, fresh.weight_dtype
        self.nested_block_size = fresh.nested_block_size
        for key in ("weight",) + _STATE_BUFFERS:
            setattr(self, key, getattr(fresh, key))
        if fresh.bias is not None:
            self.bias.data = fresh.bias.data.to(self.bias.dtype)
        expected = set(state_to_bnb_dict(state))
        unexpected_keys.extend(prefix + "weight." + k for k in entries if k not in expected)


# -- whole models -------------------------------------------------------------------------------------
def _skipped(name: str, skip_modules) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip_modules)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, quant_type: QuantType = "nf4", double_quant: bool = True,
                   skip_modules=("lm_head",), compute_dtype: torch.dtype = torch.float32, block_size: int = 64,
                   skip=None) -> nn.Module:
    """Replace every nn.Linear (except names ending in ``skip_modules``) by a Linear4bit, in place.

    Every weight is validated first (float dtype, finite, materialized), so an error leaves the model
    untouched instead of half-converted. ``skip`` is an alias of ``skip_modules``.
    """
    skip_modules = tuple(skip if skip is not None else skip_modules)
    check_block_size(block_size)
    codebook(quant_type)  # validates quant_type
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip_modules)]
    for name, linear in targets:
        if linear.weight.is_meta:
            raise ValueError(f"cannot quantize {name}.weight: it is on the meta device (not loaded); "
                             "use load_quantized_from_safetensors for meta models")
        check_finite_float(linear.weight.detach(), f"{name}.weight")
    for name, linear in targets:
        _replace(model, name, Linear4bit.from_linear(linear, quant_type, double_quant, block_size, compute_dtype,
                                                     name=f"{name}.weight"))
    return model


# -- merging LoRA into a 4-bit base -------------------------------------------------------------------
def _check_lora_over_4bit(layer: nn.Module) -> Linear4bit:
    base = getattr(layer, "base_layer", None)
    if not isinstance(base, Linear4bit) or not hasattr(layer, "delta_weight"):
        raise TypeError(f"expected a LoRA layer wrapping a Linear4bit, got {type(layer).__name__} "
                        f"over {type(base).__name__}")
    return base


def merge_to_full_precision(layer: nn.Module, adapter_names: list[str] | None = None,
                            dtype: torch.dtype | None = None) -> nn.Linear:
    """``W = dequantize(W4) + sum_a scaling_a B_a A_a`` as a plain nn.Linear (exact up to fp32 rounding).

    Use this to export or serve a QLoRA model: the base is exactly what training saw, the update is
    kept in full. ``dtype`` defaults to the dtype the base was quantized from. Adapters default to the
    layer's active ones.
    """
    base = _check_lora_over_4bit(layer)
    names = list(adapter_names) if adapter_names is not None else [n for n in layer.active_adapters if n in layer.r]
    weight = base.dequantize(torch.float32)
    for name in names:
        weight = weight + layer.delta_weight(name).to(torch.float32)
    dtype = dtype or base.weight_dtype
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=weight.device, dtype=dtype)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    merged.requires_grad_(False)
    return merged


def merge_and_requantize(layer: nn.Module, adapter_names: list[str] | None = None) -> tuple[Linear4bit, dict]:
    """Merge in fp32, then quantize the merged weight again with the base's settings.

    Returns (Linear4bit, report) with the requantization error against the fp32 merged weight:
    ``max_abs_error``, ``rel_frobenius_error`` = ||Q(W) - W||_F / ||W||_F, and
    ``delta_rel_frobenius`` = ||scaling B A||_F / ||W||_F. The 4-bit grid is coarse: when the error is
    comparable to the LoRA update (``error_exceeds_delta``), much of the fine-tune is lost — prefer
    ``merge_to_full_precision`` (or keep the adapter unmerged over the 4-bit base). Use this only when
    the deployment must stay 4-bit, and read the report.
    """
    base = _check_lora_over_4bit(layer)
    merged = merge_to_full_precision(layer, adapter_names, dtype=torch.float32)
    requantized = Linear4bit.from_linear(merged, base.quant_type, base.nested_absmax is not None, base.block_size,
                                         base.compute_dtype, name="merged weight")
    requantized.weight_dtype = base.weight_dtype
    error = requantized.dequantize(torch.float32) - merged.weight
    norm = merged.weight.norm()
    delta_norm = (merged.weight - base.dequantize(torch.float32)).norm()
    report = {"max_abs_error": float(error.abs().max()), "rel_frobenius_error": float(error.norm() / norm),
              "delta_rel_frobenius": float(delta_norm / norm)}
    report["error_exceeds_delta"] = report["rel_frobenius_error"] >= report["delta_rel_frobenius"]
    return requantized, report


def merge_model(model: nn.Module, requantize: bool = False) -> dict[str, dict]:
    """Replace, in place, every LoRA layer over a Linear4bit by its merge: an fp nn.Linear
    (``merge_to_full_precision``, default) or a new Linear4bit (``merge_and_requantize``).
    Returns {layer name: error report} (empty reports for the exact full-precision merge)."""
    reports: dict[str, dict] = {}
    for name, module in list(model.named_modules()):
        if isinstance(getattr(module, "base_layer", None), Linear4bit) and hasattr(module, "delta_weight"):
            if requantize:
                merged, reports[name] = merge_and_requantize(module)
            else:
                merged, reports[name] = merge_to_full_precision(module), {}
            _replace(model, name, merged)
    return reports


@contextmanager
def cached_dequantize(model: nn.Module) -> Iterator[nn.Module]:
    """Dequantize every Linear4bit of ``model`` once and reuse the weights until the block ends.

    Generation calls each layer once per new token; rebuilding the weight from 4 bits each time costs
    more than the matmul. Inside this block the outputs are bit-identical (same dequantized weight, same
    ops), but the full-precision weights are held in memory (4 bytes per parameter in fp32): use it for
    evaluation and decoding of models whose dequantized weights fit, never around training steps.
    """
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    try:
        for layer in layers:
            layer._weight_cache = layer.dequantize().detach()
        yield model
    finally:
        for layer in layers:
            layer._weight_cache = None
