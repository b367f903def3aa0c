"""4-bit model I/O: bnb-format checkpoints and streaming 4-bit loading.

One tensor's serialized quant state is in bnb_format.py (Linear4bit's state-dict hooks use it too);
this module builds on linear4bit.py, which never imports it.

- ``save_quantized`` / ``load_quantized``: ``model.safetensors`` in bnb's serialized layout (each
  Linear4bit as ``<name>.weight`` packed uint8 + ``.absmax``, ``.quant_map``, ``.nested_*``,
  ``.quant_state.bitsandbytes__nf4``) + a ``config.json`` whose ``quantization_config`` lets
  transformers + bitsandbytes load the directory ("*-bnb-4bit" repos load here the same way).
- ``load_quantized_from_safetensors`` / ``load_model_4bit``: build the model on the meta device
  (``empty_init``) and stream a checkpoint into it tensor by tensor, quantizing each Linear weight as it
  arrives, so the full-precision model never exists in memory.

torch + safetensors only (core never imports transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from loralab.core.bnb_format import state_from_bnb_dict
from loralab.core.linear4bit import Linear4bit, _replace, _skipped
from loralab.core.quant import quantize_4bit
from loralab.core.quant_state import QuantState, QuantType, check_block_size, codebook


# -- whole models ------------------------------------------------------------------------------------
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


def load_quantized_from_safetensors(model: nn.Module, checkpoint, quant_type: QuantType = "nf4",
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
    check_block_size(block_size)
    codebook(quant_type)
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

    def install(name: str, packed: torch.Tensor, state: QuantState) -> None:
        linear = modules.get(name)
        if not isinstance(linear, (nn.Linear, Linear4bit)):
            raise ValueError(f"{name}.weight is 4-bit in the checkpoint but {name} is "
                             f"{type(linear).__name__ if linear is not None else 'missing'} in the model")
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}.weight: quant state shape {tuple(state.shape)} does not match the model's "
                             f"({linear.out_features}, {linear.in_features})")
        new = Linear4bit(linear.in_features, linear.out_features, packed, state, linear.bias, compute_dtype,
                         f"{name}.weight")  # validates packed and state, naming the tensor
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
            install(mod_name, get(), state_from_bnb_dict(entries, key))
        elif attr == "weight" and quantize and mod_name in targets:
            dtype = modules[mod_name].weight.dtype
            packed, state = quantize_4bit(get().to(dtype), quant_type, block_size, double_quant, name=key)
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


def load_model_4bit(model_dir, build_model, quant_type: QuantType = "nf4", double_quant: bool = True,
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
