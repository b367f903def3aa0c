"""A plain, merged copy of an adapted model for inference (decoding, serving); the model is untouched.

Each LoRA layer of the copy becomes its base module with the branch its forward applies *now* folded in,

    W = W0 + sum_a scaling_a B_a A_a      (a: active, not yet merged, adapters enabled),

computed in float32 and rounded once to ``dtype`` (so a bf16 copy of an fp32 run holds round(W0 + dW),
not round(W0) + round(dW)). A 4-bit base is dequantized first (``W0 = dequantize(W4)``). Inside a
``disable_adapters`` block the copy is the base model; a ``modules_to_save`` wrapper becomes the module
it runs now. Every other floating parameter is cast to ``dtype``; buffers (rotary frequencies, position
ids) keep theirs. The trained adapter stays unmerged in ``model``: the copy shares no tensor with it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from loralab.core.inject import ModulesToSaveWrapper, lora_modules
from loralab.core.linear4bit import Linear4bit
from loralab.core.lora import LoraLayer


def applied_adapters(layer: LoraLayer) -> list[str]:
    """The adapters a LoRA layer's forward adds on top of its base weight right now."""
    if layer.adapters_disabled:
        return []
    return [n for n in layer.active_adapters if n in layer.r and n not in layer.merged_adapters]


def mergeable(model: nn.Module) -> bool:
    """True when ``merged_copy`` gives a plain model: every loralab module in it is a LoRA layer with a
    dense update, a modules_to_save wrapper or a 4-bit linear (bottleneck adapters and prefixes add
    computation that no weight can hold)."""
    for module in model.modules():
        if not type(module).__module__.startswith("loralab."):
            continue
        if isinstance(module, LoraLayer):
            if not hasattr(module, "delta_weight") or not hasattr(module.base_layer, "weight"):
                return False
        elif not isinstance(module, (ModulesToSaveWrapper, Linear4bit)):
            return False
    return True


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def merged_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` without loralab layers, in ``dtype`` (None: each parameter keeps its dtype),
    frozen and in eval mode. Raises ValueError for a model ``mergeable`` refuses."""
    if not mergeable(model):
        kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("loralab.")})
        raise ValueError(f"cannot fold this model's methods into its weights (it holds {kinds}): bottleneck "
                         "adapters and prefixes are extra computation; decode the model itself instead")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    merged: dict[int, torch.Tensor] = {}  # id(base weight) -> the weight with the branch folded in
    dequantized: dict[str, nn.Linear] = {}  # LoRA over 4-bit, by module name
    for name, layer in lora_modules(model):
        base, names = layer.base_layer, applied_adapters(layer)
        quantized = isinstance(base, Linear4bit)
        if not (quantized or names):
            continue  # the base weight as it is
        weight = base.dequantize(torch.float32) if quantized else base.weight.detach().to(torch.float32)
        for n in names:
            weight = weight + layer.delta_weight(n).to(torch.float32)
        if quantized:
            dequantized[name] = _dense_linear(weight, base.bias, dtype or base.weight_dtype)
        else:
            merged[id(base.weight)] = weight.to(dtype or base.weight.dtype)
    # deepcopy with a memo that hands out the final parameters: no full-precision duplicate is made, and
    # tied weights (one Parameter used twice) stay tied
    memo: dict[int, object] = {}
    for p in model.parameters():
        if id(p) not in memo:
            value = merged[id(p)] if id(p) in merged else cast(p.detach()).clone()
            memo[id(p)] = nn.Parameter(value, requires_grad=False)
    out = copy.deepcopy(model, memo)
    for name, layer in list(lora_modules(out)):
        _set(out, name, dequantized[name] if name in dequantized else layer.base_layer)
    for name, wrapper in [(n, m) for n, m in out.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
        _set(out, name, wrapper.active_module)
    for name, layer in [(n, m) for n, m in out.named_modules() if isinstance(m, Linear4bit)]:
        _set(out, name, _dense_linear(layer.dequantize(torch.float32), layer.bias, dtype or layer.weight_dtype))
    if hasattr(out, "lora_configs"):
        del out.lora_configs
    return out.requires_grad_(False).eval()
