"""One entry point for every fine-tuning method: apply, count by kind, save, load, merge.

Methods (settings in brackets, defaults as in the functions below; "head" is the classification head
that trains fully with the method, "auto" = the model's top-level ``classifier``/``score`` modules):

* ``lora``         LoraConfig fields (inject.py); the head goes in ``modules_to_save``.
* ``full``         every parameter.                                  [—]
* ``bitfit``       every ``*.bias`` + head.                          [head]
* ``adapter_h``    2 adapters per layer (adapters.py).               [r, activation, train_layernorm, head]
* ``adapter_l``    1 adapter + LayerNorm per layer.                  [r, activation, head]
* ``adapter_p``    1 adapter per layer after the FFN.                [r, activation, head]
* ``prefix_layer`` K/V prefixes in every layer (prefix.py).          [l_p, reparam, reparam_dim, reparam_hidden, head]
* ``prefix_embed`` prefix/infix embeddings (prefix_embed.py).        [l_p, l_i, prefix_after, head]
* ``ft_top2``      the last k transformer layers + head.             [k=2, head]

One method per model: a second ``apply_method`` (or LoRA with another method) is refused, because the
methods freeze each other's parameters (``inject_adapter`` re-freezes everything but LoRA; every other
method freezes everything but itself), the saved directory records one method, and ``ft_top2`` + LoRA
would train the same layers twice. ``count_by_kind`` splits parameters, each tensor once, into disjoint
kinds: lora, adapter, prefix, head, bias (other biases), layers (transformer-layer weights), other.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.core import adapters, prefix, prefix_embed
from loralab.core.blocks import find_layers, hidden_size, is_causal

METHODS = ("lora", "full", "bitfit", "adapter_h", "adapter_l", "adapter_p", "prefix_layer", "prefix_embed", "ft_top2")
STATE = "loralab_method"
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
AUTO_HEADS = ("pre_classifier", "classifier", "score")
KINDS = ("lora", "adapter", "prefix", "head", "bias", "layers", "other")


def _heads(model: nn.Module, head: list[str] | str | None) -> list[str]:
    children = dict(model.named_children())
    if head == "auto":
        return [n for n in AUTO_HEADS if n in children]
    names = [head] if isinstance(head, str) else list(head or [])
    missing = [n for n in names if n not in children]
    if missing:
        raise ValueError(f"head {missing} is not a top-level module of {type(model).__name__} ({list(children)})")
    return names


def _full(model: nn.Module) -> dict:
    model.requires_grad_(True)
    return {}


def _bitfit(model: nn.Module) -> dict:
    if not any(name.split(".")[-1] == "bias" for name, _ in model.named_parameters()):
        raise ValueError(f"bitfit: {type(model).__name__} has no bias parameters to train")
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[-1] == "bias")
    return {}


def _ft_top(model: nn.Module, k: int = 2) -> dict:
    _, layers = find_layers(model)
    if not 1 <= k <= len(layers):
        raise ValueError(f"ft_top2: k must be in [1, {len(layers)}] (the model has {len(layers)} layers), got {k}")
    model.requires_grad_(False)
    for layer in layers[len(layers) - k:]:
        layer.requires_grad_(True)
    return {"count": sum(p.numel() for layer in layers[len(layers) - k:] for p in layer.parameters())}


def _adapter(variant: str) -> Callable[..., dict]:
    def apply(model: nn.Module, r: int = 8, activation: str = "relu", train_layernorm: bool = False) -> dict:
        info = adapters.add_adapters(model, variant, r, activation, train_layernorm)
        info["paper"] = adapters.adapter_count(info["d"], r, info["n_adapters"], info["n_layernorms"])
        return info
    if variant != "adapter_h":  # train_layernorm is Houlsby's option only
        def apply_fixed(model: nn.Module, r: int = 8, activation: str = "relu") -> dict:
            return apply(model, r, activation)
        return apply_fixed
    return apply


def _prefix_layer(model: nn.Module, l_p: int = 10, reparam: bool = False, reparam_dim: int = 512,
                  reparam_hidden: int = 512) -> dict:
    info = prefix.add_prefixes(model, l_p, reparam, reparam_dim, reparam_hidden)
    info.update(prefix.prefix_count(info["n_layers"], hidden_size(model), l_p, 0, info["d_kv"]))
    return info


def _prefix_embed(model: nn.Module, l_p: int = 10, l_i: int = 0, prefix_after: int | None = None) -> dict:
    info = prefix_embed.add_prefix_embedding(model, l_p, l_i, prefix_after, causal=is_causal(model))
    info["paper"] = info["d"] * (l_p + l_i)
    return info


APPLY: dict[str, Callable[..., dict]] = {
    "full": _full, "bitfit": _bitfit, "ft_top2": _ft_top, "adapter_h": _adapter("adapter_h"),
    "adapter_l": _adapter("adapter_l"), "adapter_p": _adapter("adapter_p"),
    "prefix_layer": _prefix_layer, "prefix_embed": _prefix_embed,
}


def _refuse_combination(model: nn.Module, name: str) -> None:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; loralab has {METHODS}")
    have = getattr(model, STATE, None)
    if have is not None:
        raise ValueError(f"the model already has method {have['method']!r}; loralab applies one method per model "
                         f"(they freeze each other's parameters and a saved directory records one): build a "
                         f"fresh base model for {name!r}")
    if getattr(model, "lora_configs", None) and name != "lora":
        raise ValueError(f"the model has LoRA adapters {list(model.lora_configs)}; {name!r} cannot be combined with "
                         "them (inject_adapter re-freezes every non-LoRA parameter and the files hold one method): "
                         "build a fresh base model, or merge_and_unload the LoRA first")


def apply_method(model: nn.Module, name: str, **settings: Any) -> dict:
    """Apply method ``name`` in place; returns {"method", "trainable", "total", "by_kind", "formula"}
    ("formula": the method's own count terms, e.g. adapters' {"d", "r", "n_adapters", "n_layernorms",
    "count", "paper"}; prefix_layer's {"paper": L·d·l_p, "kv": 2·L·d_kv·l_p, ...})."""
    _refuse_combination(model, name)
    if name == "lora":
        from loralab.core.config import LoraConfig
        from loralab.core.inject import inject_adapter
        adapter = settings.pop("adapter_name", "default")
        inject_adapter(model, LoraConfig(**settings), adapter)
        recorded: dict[str, Any] = {"adapter_name": adapter}
        info: dict[str, Any] = {}
    else:
        head = settings.pop("head", "auto") if name != "full" else []
        apply = APPLY[name]
        allowed = list(inspect.signature(apply).parameters)[1:]
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise ValueError(f"{name}: unknown setting(s) {unknown}; it takes {allowed + ['head']}")
        heads = _heads(model, head)
        info = apply(model, **settings)
        for h in heads:
            getattr(model, h).requires_grad_(True)
        defaults = {k: v.default for k, v in inspect.signature(apply).parameters.items() if k in allowed}
        recorded = {**defaults, **settings, "head": heads}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    model.__dict__[STATE] = {"method": name, "settings": recorded, "params": trainable}
    by_kind = count_by_kind(model)
    return {"method": name, "trainable": by_kind["trainable"], "total": by_kind["total"],
            "by_kind": by_kind["by_kind"], "formula": info}


def _kind(name: str, heads: set[str], layers_prefix: str) -> str:
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):
        return "lora"  # a modules_to_save copy is not: it counts where its module does (a head: "head")
    if "adapter" in parts:
        return "adapter"
    if any(p in (prefix.ATTR, prefix.REPARAM_ATTR, prefix_embed.ATTR) for p in parts):
        return "prefix"
    if parts[0] in heads:
        return "head"
    if parts[-1] == "bias":
        return "bias"
    return "layers" if layers_prefix and name.startswith(layers_prefix + ".") else "other"


def count_by_kind(model: nn.Module) -> dict:
    """{"trainable", "total", "by_kind": {kind: {"trainable", "total"}}} over KINDS, each tensor once."""
    state = getattr(model, STATE, None) or {}
    heads = set(state.get("settings", {}).get("head") or _heads(model, "auto"))
    try:
        layers_prefix = find_layers(model)[0]
    except ValueError:
        layers_prefix = ""
    out = {k: {"trainable": 0, "total": 0} for k in KINDS}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = out[_kind(name, heads, layers_prefix)]
        kind["total"] += p.numel()
        kind["trainable"] += p.numel() if p.requires_grad else 0
    return {"trainable": sum(v["trainable"] for v in out.values()),
            "total": sum(v["total"] for v in out.values()), "by_kind": out}


def _state(model: nn.Module) -> dict:
    state = getattr(model, STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no loralab method applied (apply_method first)")
    return state


def method_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's tensors by parameter name; a prefix reparametrisation is merged into plain prefixes."""
    state = _state(model)
    params = dict(model.named_parameters())
    out = {n: params[n].detach().cpu().contiguous() for n in state["params"] if prefix.REPARAM_ATTR not in n}
    shared = getattr(model, prefix.REPARAM_ATTR, None)
    if shared is not None:
        with torch.no_grad():
            for path, kv in prefix.prefix_modules(model):
                k, v = shared.layer_kv(kv.layer_idx)
                out[f"{path}.key"], out[f"{path}.value"] = k.cpu().contiguous(), v.cpu().contiguous()
    return out


def save_method(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_config.json`` ({"method": ..., settings}) + ``adapter_model.safetensors``.
    LoRA is saved in PEFT's format (adapter_io.save_adapter); ``full`` is refused (use save_pretrained)."""
    state, directory = _state(model), Path(directory)
    if state["method"] == "lora":
        from loralab.core.adapter_io import save_adapter
        return save_adapter(model, directory, state["settings"]["adapter_name"])
    if state["method"] == "full":
        raise NotImplementedError("method 'full' trains every weight: save the whole model with save_pretrained")
    settings = dict(state["settings"])
    config = {"method": state["method"], **settings}
    if settings.get("reparam"):
        config.update(reparam=False, merged_reparametrization=True)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = directory / f".{WEIGHTS_NAME}.tmp-{os.getpid()}", directory / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    save_file(method_state_dict(model), str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp_w, directory / WEIGHTS_NAME)
    os.replace(tmp_c, directory / CONFIG_NAME)
    return directory


def load_method(model: nn.Module, directory: str | Path, trainable: bool = True) -> dict:
    """Apply the saved method to a fresh base ``model`` and load its tensors exactly (missing, unexpected or
    mis-shaped tensors raise). A PEFT/loralab LoRA directory (no "method" field) loads as LoRA."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is this a saved adapter/method directory?")
    config = json.loads(path.read_text())
    if config.get("method", "lora") == "lora":
        _refuse_combination(model, "lora")
        from loralab.core.adapter_io import load_adapter
        load_adapter(model, directory, "default", trainable=trainable)
        model.__dict__[STATE] = {"method": "lora", "settings": {"adapter_name": "default"},
                                 "params": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
        return count_by_kind(model)
    config.pop("merged_reparametrization", None)
    info = apply_method(model, config.pop("method"), **config)
    saved, params = load_file(str(directory / WEIGHTS_NAME)), dict(model.named_parameters())
    expected = set(_state(model)["params"])
    missing, unexpected = sorted(expected - saved.keys()), sorted(saved.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{directory} does not fit this {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (another base model or loralab version?)")
    with torch.no_grad():
        for name in expected:
            if tuple(saved[name].shape) != tuple(params[name].shape):
                raise ValueError(f"{directory}: {name} is {tuple(saved[name].shape)} in the file but "
                                 f"{tuple(params[name].shape)} in the model (another base model?)")
            params[name].copy_(saved[name].to(params[name].dtype))
    if not trainable:
        model.requires_grad_(False)
    return info


def saved_method(directory: str | Path) -> str:
    """The method a saved directory holds: its config's "method" ("lora" for a PEFT/loralab LoRA adapter)."""
    from loralab.core.adapter_io import read_config_json

    method = read_config_json(directory).get("method", "lora")
    if method not in METHODS:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: method {method!r} is not one of {METHODS}")
    return method


def merge_refusal(method: str) -> str | None:
    """Why ``method`` cannot be folded into the base weights, or None: LoRA folds, and full/bitfit/ft_top2
    have nothing to fold (the trained weights are the model's own)."""
    if method.startswith("adapter_"):
        return adapters.WHY_NO_MERGE
    return {"prefix_layer": prefix.WHY_NO_MERGE, "prefix_embed": prefix_embed.WHY_NO_MERGE}.get(method)


def missing_heads(directory: str | Path) -> list[str]:
    """The heads a saved method lists (config "head") with no tensor in its weights file."""
    from safetensors import safe_open

    from loralab.core.adapter_io import read_config_json

    directory = Path(directory)
    heads = read_config_json(directory).get("head") or []
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
    return [h for h in heads if not any(k.startswith(h + ".") for k in keys)]


def merge_method(model: nn.Module) -> None:
    """LoRA: fold into the base weights. full/bitfit/ft_top2: nothing to merge (the trained weights are the
    model's own). Adapters and prefixes: NotImplementedError saying why they cannot merge."""
    name = _state(model)["method"]
    if name == "lora":
        from loralab.core.inject import merge_adapters
        merge_adapters(model)
    elif (refusal := merge_refusal(name)):
        raise NotImplementedError(refusal)
