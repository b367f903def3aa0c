"""Linear4bit: a frozen linear layer stored in 4 bits (QLoRA's base), model conversion, bnb-format I/O.

Forward: ``y = x @ dequantize(W4).T + b`` in ``compute_dtype``. The dequantized weight lives only
inside one forward / backward call: the autograd function keeps a reference to the module, not the
(out x in) matrix, and rebuilds it in backward (``dx = dy @ W``). There is no weight gradient: the base
is frozen; LoRA (``LoraLinear(Linear4bit)``) trains A and B on top.

State dicts use bitsandbytes' serialized layout so checkpoints interoperate with transformers +
bitsandbytes ("*-bnb-4bit" repos): ``<name>.weight`` (packed uint8, shape (ceil(n/2), 1)),
``<name>.weight.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and
``.quant_state.bitsandbytes__nf4`` (a JSON blob as uint8), plus ``<name>.bias``.

Model-level tools below: quantize_model (in place, validated first), save_quantized / load_quantized
(bnb format, transformers-compatible), load_quantized_from_safetensors / load_model_4bit (stream a
checkpoint into a meta-device model, quantizing each Linear weight as it arrives), and the merges
merge_to_full_precision / merge_and_requantize. torch + safetensors only.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.core import quant as Q

_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")


class _Dequantized4bitMatmul(torch.autograd.Function):
    """y = x W^T with W rebuilt from 4 bits; backward recomputes W instead of saving it (memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "Linear4bit") -> torch.Tensor:
        ctx.module = module
        ctx.input_dtype = x.dtype
        weight = module.dequantize()
        return (x.to(weight.dtype) @ weight.T).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = ctx.module.dequantize()
        return (grad_out.to(weight.dtype) @ weight).to(ctx.input_dtype), None


class Linear4bit(nn.Module):
    """Frozen 4-bit linear layer. Buffers: ``weight`` (packed uint8) and the quant state; bias frozen."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, state: Q.QuantState,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        if tuple(state.shape) != (out_features, in_features):
            raise ValueError(f"quant state shape {tuple(state.shape)} != (out_features, in_features) "
                             f"= ({out_features}, {in_features})")
        Q.check_packed(packed, state, "Linear4bit.weight")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.quant_type, self.block_size, self.weight_dtype = state.quant_type, state.block_size, state.dtype
        self.nested_block_size = state.nested_block_size
        self.register_buffer("weight", packed.reshape(-1, 1).to(torch.uint8))
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code.float())
        nested = state.double_quant
        self.register_buffer("nested_absmax", state.nested_absmax if nested else None)
        self.register_buffer("nested_quant_map", state.nested_code if nested else None)
        self.register_buffer("offset", state.offset.reshape(()).float() if nested else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: Q.QuantType = "nf4", double_quant: bool = True,
                    block_size: int = 64, compute_dtype: torch.dtype = torch.float32,
                    name: str = "linear.weight") -> "Linear4bit":
        """Quantize an nn.Linear's weight (errors name ``name``); the bias is kept in its dtype."""
        packed, state = Q.quantize_4bit(linear.weight.detach(), quant_type, block_size, double_quant, name=name)
        return cls(linear.in_features, linear.out_features, packed, state, linear.bias, compute_dtype)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the 4-bit state; a dtype cast (``model.half()``, ``.to(bf16)``) must not
        touch it: absmax / offset / codebooks stay fp32, codes uint8 (only the bias follows)."""
        originals = {k: self._buffers[k] for k in ("weight",) + _STATE_BUFFERS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for key, original in originals.items():
            if self._buffers[key].dtype != original.dtype:
                self._buffers[key] = original.to(self._buffers[key].device)
        return self

    def quant_state(self) -> Q.QuantState:
        state = Q.QuantState(self.quant_type, self.block_size, (self.out_features, self.in_features),
                             self.weight_dtype, self.absmax, self.quant_map)
        if self.nested_absmax is not None:
            state.offset, state.nested_absmax = self.offset, self.nested_absmax
            state.nested_code, state.nested_block_size = self.nested_quant_map, self.nested_block_size
        return state

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in ``dtype`` (default: compute_dtype)."""
        return Q.dequantize_4bit(self.weight, self.quant_state(), dtype or self.compute_dtype)

    def bits_per_param(self) -> float:
        return Q.bits_per_param(self.weight, self.quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Dequantized4bitMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, block_size={self.block_size}{dq}, compute_dtype={self.compute_dtype}")

    # -- bitsandbytes serialized format -------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for key, value in Q.state_to_bnb_dict(self.quant_state()).items():
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
            state = Q.state_from_bnb_dict(entries, f"{name}.weight")
            fresh = Linear4bit(self.in_features, self.out_features, state_dict[prefix + "weight"], state,
                               state_dict.get(prefix + "bias"), self.compute_dtype)
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
        expected = set(Q.state_to_bnb_dict(state))
        unexpected_keys.extend(prefix + "weight." + k for k in entries if k not in expected)


# -- whole models -------------------------------------------------------------------------------------
def _skipped(name: str, skip_modules) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip_modules)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, quant_type: Q.QuantType = "nf4", double_quant: bool = True,
                   skip_modules=("lm_head",), compute_dtype: torch.dtype = torch.float32, block_size: int = 64,
                   skip=None) -> nn.Module:
    """Replace every nn.Linear (except names ending in ``skip_modules``) by a Linear4bit, in place.

    Every weight is validated first (float dtype, finite, materialized), so an error leaves the model
    untouched instead of half-converted. ``skip`` is an alias of ``skip_modules``.
    """
    skip_modules = tuple(skip if skip is not None else skip_modules)
    Q.check_block_size(block_size)
    Q.codebook(quant_type)  # validates quant_type
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip_modules)]
    for name, linear in targets:
        if linear.weight.is_meta:
            raise ValueError(f"cannot quantize {name}.weight: it is on the meta device (not loaded); "
                             "use load_quantized_from_safetensors for meta models")
        Q.check_finite_float(linear.weight.detach(), f"{name}.weight")
    for name, linear in targets:
        _replace(model, name, Linear4bit.from_linear(linear, quant_type, double_quant, block_size, compute_dtype,
                                                     name=f"{name}.weight"))
    return model


def _quant_settings(model: nn.Module) -> dict:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("model has no Linear4bit layers; quantize_model(model) first")
    kinds = {(m.quant_type, m.nested_absmax is not None, m.compute_dtype, m.block_size) for _, m in layers}
    if len(kinds) != 1:
        raise ValueError("bitsandbytes' config.json describes one 4-bit scheme per model; "
                         f"found {sorted(map(str, kinds))}")
    quant_type, nested, compute, block = kinds.pop()
    if quant_type == "int4":
        raise ValueError("bitsandbytes has no int4 format: save nf4 or fp4 models")
    if block != 64:
        raise ValueError(f"transformers' bitsandbytes loader assumes block size 64 when quantizing, got {block}")
    return {"quant_type": quant_type, "double_quant": nested, "compute_dtype": compute}


def save_quantized(model: nn.Module, out_dir, config: dict | None = None) -> None:
    """Write ``model.safetensors`` (bnb serialized 4-bit layers) + ``config.json`` with a bitsandbytes
    ``quantization_config`` so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.

    ``config``: the model config dict (default: ``model.config.to_dict()`` for HF models).
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    settings = _quant_settings(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, torch.dtype]] = set()
    for key, value in model.state_dict().items():
        value = value.detach().contiguous()
        ident = (value.data_ptr(), value.numel(), value.dtype)
        tensors[key] = value.clone() if ident in seen else value  # tied weights: safetensors refuses aliases
        seen.add(ident)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config is None:
        if not hasattr(model, "config"):
            raise ValueError("save_quantized needs config=... for a model without .config")
        config = model.config.to_dict()
    skipped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and not isinstance(m, Linear4bit)})
    config = dict(config)
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": settings["quant_type"], "bnb_4bit_use_double_quant": settings["double_quant"],
        "bnb_4bit_compute_dtype": str(settings["compute_dtype"]).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skipped or None,
        "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


# -- streaming 4-bit load -----------------------------------------------------------------------------
def _checkpoint_getters(source) -> dict:
    """key -> zero-argument loader; a state dict, a .safetensors file, or a directory of shards."""
    from pathlib import Path

    if isinstance(source, dict):
        return {k: (lambda v=v: v) for k, v in source.items()}
    from safetensors import safe_open

    path = Path(source)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    getters = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
        for key in keys:
            getters[key] = (lambda f=str(file), k=key: _read_tensor(f, k))
    return getters


def _read_tensor(file: str, key: str) -> torch.Tensor:
    """Open, read one tensor, close. A handle kept open keeps the file mapped, and every page read
    through it stays in the process's resident set until the end of the load (the whole checkpoint)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(key)


def _set_tensor(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    value = value.to(old.dtype) if old is not None and old.is_floating_point() else value
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[attr] = value


def load_quantized_from_safetensors(model: nn.Module, checkpoint, quant_type: Q.QuantType = "nf4",
                                    double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                                    skip_modules=("lm_head",), block_size: int = 64, quantize: bool = True,
                                    strict: bool = True) -> nn.Module:
    """Stream ``checkpoint`` (dir of safetensors shards, one file, or a state dict) into ``model``.

    ``model`` is usually built on the meta device (``empty_init()``), so no full-precision copy of the
    linear weights ever exists: each tensor is read on its own; Linear weights (except ``skip_modules``)
    are quantized on arrival into Linear4bit layers; other tensors (embeddings, norms, skipped linears)
    are materialized in the model's dtype. Tensors already in bnb 4-bit format (``*.weight.quant_state.
    bitsandbytes__nf4`` present) load as they are. ``quantize=False`` loads only prequantized layers.
    Tied parameters (one tensor under several names) are filled once for all names. Afterwards nothing
    may be left on the meta device; ``strict`` also rejects checkpoint keys the model lacks.
    """
    Q.check_block_size(block_size)
    Q.codebook(quant_type)
    getters = _checkpoint_getters(checkpoint)
    marker = ".weight.quant_state.bitsandbytes__"
    prequantized = {k.split(marker)[0] for k in getters if marker in k}
    companions: dict[str, dict[str, str]] = {name: {} for name in prequantized}
    for key in getters:
        head, sep, tail = key.partition(".weight.")
        if sep and head in prequantized:
            companions[head][tail] = key
    modules = dict(model.named_modules())
    owners: dict[str, list[tuple[nn.Module, str]]] = {}
    by_tensor: dict[int, list[tuple[nn.Module, str]]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for full_name, tensor in named:
        mod_name, _, attr = full_name.rpartition(".")
        owners[full_name] = by_tensor.setdefault(id(tensor), [])
        by_tensor[id(tensor)].append((modules[mod_name], attr))
    targets = {n for n, m in modules.items() if isinstance(m, nn.Linear) and not _skipped(n, skip_modules)}
    unexpected: list[str] = []

    def install(name: str, packed: torch.Tensor, state: Q.QuantState) -> None:
        linear = modules.get(name)
        if not isinstance(linear, (nn.Linear, Linear4bit)):
            raise ValueError(f"{name}.weight is 4-bit in the checkpoint but {name} is "
                             f"{type(linear).__name__ if linear is not None else 'missing'} in the model")
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}.weight: quant state shape {tuple(state.shape)} does not match the model's "
                             f"({linear.out_features}, {linear.in_features})")
        Q.check_packed(packed, state, f"{name}.weight")
        new = Linear4bit(linear.in_features, linear.out_features, packed, state, linear.bias, compute_dtype)
        _replace(model, name, new)
        modules[name] = new
        owners[f"{name}.bias"] = [(new, "bias")]

    for key, get in getters.items():
        mod_name, _, attr = key.rpartition(".")
        is_companion = mod_name.endswith(".weight") and mod_name[: -len(".weight")] in prequantized
        if is_companion or ".weight.quant_state." in key:
            continue  # quant-state companion, read together with its weight
        if attr == "weight" and mod_name in prequantized:
            entries = {tail: getters[k]() for tail, k in companions[mod_name].items()}
            install(mod_name, get(), Q.state_from_bnb_dict(entries, key))
        elif attr == "weight" and quantize and mod_name in targets:
            dtype = modules[mod_name].weight.dtype
            packed, state = Q.quantize_4bit(get().to(dtype), quant_type, block_size, double_quant, name=key)
            install(mod_name, packed, state)
        elif key in owners:
            value, first = get(), None
            for module, name in owners[key]:
                if first is None:
                    _set_tensor(module, name, value)
                    first = getattr(module, name)
                else:  # tied names share the one converted tensor (per-name casts would untie and copy it)
                    (module._parameters if name in module._parameters else module._buffers)[name] = first
        else:
            unexpected.append(key)
    _rebuild_computed_buffers(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"checkpoint {checkpoint if not isinstance(checkpoint, dict) else '(state dict)'} lacks "
                         f"{len(left)} tensors the model needs (still on the meta device): {left[:10]}. "
                         "Non-persistent buffers must not be built on meta: build the model under empty_init().")
    if strict and unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensors the model lacks: {unexpected[:10]}")
    return model


def _rebuild_computed_buffers(model: nn.Module) -> None:
    """Non-persistent buffers are computed, never stored (e.g. rotary ``inv_freq``). A model built under
    ``torch.device("meta")`` has them on meta; a module that was built from a ``config`` attribute is
    rebuilt on the CPU from that config and its computed buffers are taken over."""
    for module in model.modules():
        missing = [b for b in module._non_persistent_buffers_set
                   if module._buffers.get(b) is not None and module._buffers[b].is_meta]
        if not missing or not hasattr(module, "config"):
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(module.config)
        except Exception:  # noqa: BLE001 - not rebuildable from its config: reported as missing below
            continue
        for b in missing:
            module._buffers[b] = fresh._buffers[b]


def load_quantized(model: nn.Module, source, compute_dtype: torch.dtype = torch.float32,
                   strict: bool = True) -> nn.Module:
    """Load a bitsandbytes 4-bit checkpoint (a "*-bnb-4bit" dir, file or state dict) into ``model``
    (real or meta). Layers stored in 4 bits become Linear4bit; everything else loads as stored."""
    return load_quantized_from_safetensors(model, source, compute_dtype=compute_dtype, skip_modules=(),
                                           quantize=False, strict=strict)


class empty_init:
    """Context manager: parameters created inside live on the meta device (no memory, no init cost);
    buffers stay real, so computed non-persistent buffers (rotary inv_freq, ...) remain valid."""

    def __enter__(self):
        self._original = nn.Module.register_parameter

        def register_on_meta(module: nn.Module, name: str, param):
            self._original(module, name, param)
            if param is not None and not param.is_meta:
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

        nn.Module.register_parameter = register_on_meta
        return self

    def __exit__(self, *exc) -> None:
        nn.Module.register_parameter = self._original


def load_model_4bit(model_dir, build_model, quant_type: Q.QuantType = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32, skip_modules=("lm_head",),
                    block_size: int = 64) -> nn.Module:
    """Build ``build_model()`` under ``empty_init()`` and stream ``model_dir`` into it in 4 bits.

    ``build_model`` is a zero-argument callable (e.g. ``lambda: AutoModelForCausalLM.from_config(cfg)``);
    core never imports transformers. The full-precision model never exists in memory.
    """
    with empty_init():
        model = build_model()
    return load_quantized_from_safetensors(model, model_dir, quant_type, double_quant, compute_dtype,
                                           skip_modules, block_size)


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
