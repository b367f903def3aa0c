"""Put LoRA adapters into a model, switch them, merge them, take them out again.

``inject_adapter(model, config, name)`` wraps every targeted layer in a LoRA layer (in place), wraps
``modules_to_save`` in a ``ModulesToSaveWrapper`` holding one trainable copy per adapter (as PEFT does;
its parameters are at ``<path>.modules_to_save.<adapter>.*``), freezes everything else and makes the new
adapter the single active, trainable one. ``model.lora_configs[name]`` records its config.

Target names (``target_modules``, ``exclude_modules``, ``fused_qkv`` keys, ``modules_to_save``) match
whole dotted components: "query" matches "encoder.layer.0.attention.self.query" but not "myquery". A
plain string ``target_modules`` is a regex matched with ``re.fullmatch`` against the full name;
"all-linear" takes every Linear/Conv1D except the output head (``get_output_embeddings()``, "lm_head",
layers sharing the input embedding weight) and ``modules_to_save``. ``rank_pattern`` / ``alpha_pattern``
keys follow PEFT exactly: a regex matched against a dotted suffix of the name, the first matching key
winning; a key that matches no adapted layer is refused.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from loralab.core.config import LoraConfig
from loralab.core.lora import LoraLayer, LoraLinear, base_kind
from loralab.core.lora_conv_emb import LoraConv2d, LoraEmbedding


class ModulesToSaveWrapper(nn.Module):
    """A module trained fully with an adapter: the frozen original plus one trainable copy per adapter.

    The forward runs the active adapter's copy, or the original when none is active or adapters are
    disabled. Attribute reads fall through to the module in use (``wrapper.weight`` etc.).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    @property
    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)


def _suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _pattern_key_match(name: str, key: str, field: str) -> bool:
    r"""PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` keys: the key is a regex that must match a
    whole trailing run of dotted components, ``re.match(r"(.*\.)?(key)$", name)``. So "v_proj" and
    "self_attn.v_proj" are suffixes, and ``layers\.1\.self_attn\.v_proj`` matches
    "model.layers.1.self_attn.v_proj" (a full match over the whole name would miss it)."""
    try:
        return re.match(rf"(.*\.)?({key})$", name) is not None
    except re.error as err:
        raise ValueError(f"LoraConfig.{field} key '{key}' is not a valid regex ({err})") from err


def _first_match(name: str, pattern: dict, default, field: str):
    """The value of the first key (in the dict's order, as PEFT) that matches ``name``, else ``default``."""
    return next((v for k, v in pattern.items() if _pattern_key_match(name, k, field)), default)


def _check_patterns(config: LoraConfig, names: list[str]) -> None:
    """A pattern key that matches no adapted layer is a typo that would silently leave r / alpha at the
    default: refuse it, listing the adapted names to pick from."""
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field):
            if not any(_pattern_key_match(n, key, field) for n in names):
                raise ValueError(f"LoraConfig.{field} key '{key}' matches none of the {len(names)} adapted layers "
                                 f"(e.g. {names[:3]}); keys are regexes matched, as in PEFT, against a dotted "
                                 "suffix of the name, e.g. r'layers\\.1\\.self_attn\\.v_proj'")


def _names_match(name: str, spec: list[str] | str | None) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_suffix_match(name, k) for k in spec)


def _is_linear_like(module: nn.Module) -> bool:
    try:
        base_kind(module)
        return True
    except TypeError:
        return False


def _is_candidate(module: nn.Module) -> bool:
    return _is_linear_like(module) or isinstance(module, (nn.Conv2d, nn.Embedding))


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, without the insides of LoRA layers and modules_to_save wrappers."""
    out, skip = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            skip.append(name)
        out.append((name, module))
    return out


def _short_names(names: list[str]) -> list[str]:
    """Shortest suffix of each name that picks out its role (names equal up to layer indices) and nothing else.
    A suffix that must cross a layer index is shown as a regex (``.*layer\\.\\d+\\.output\\.dense``)."""
    role = {n: re.sub(r"\.\d+(?=\.|$)", "", n) for n in names}
    short = set()
    for n in names:
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            tail = parts[-k:]
            suffix = ".".join(c for c in tail if not c.isdigit())
            if tail[0].isdigit() or not all(role[m] == role[n] for m in names if _suffix_match(role[m], suffix)):
                continue
            if any(c.isdigit() for c in tail):
                suffix = ".*" + r"\.".join(r"\d+" if c.isdigit() else re.escape(c) for c in tail)
            short.add(suffix)
            break
    return sorted(short)


def _output_head_names(model: nn.Module, leaves: list[tuple[str, nn.Module]]) -> set[str]:
    embedding_weights = {id(m.weight) for _, m in leaves if isinstance(m, nn.Embedding)}
    get_out = getattr(model, "get_output_embeddings", None)
    out_head = get_out() if callable(get_out) else None
    return {
        n for n, m in leaves
        if n.split(".")[-1] == "lm_head" or m is out_head or id(getattr(m, "weight", None)) in embedding_weights
    }


def _find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    leaves = _leaf_modules(model)
    candidates = [(n, m) for n, m in leaves if n and (_is_candidate(m) or isinstance(m, LoraLayer))]
    saved = config.modules_to_save or []
    heads = _output_head_names(model, leaves) if config.target_modules == "all-linear" else set()
    targets = []
    for name, module in leaves:
        if not name or any(_suffix_match(name, s) or any(name.startswith(p + ".") for p in _prefixes(name, s)) for s in saved):
            continue
        fused = any(_suffix_match(name, k) for k in config.fused_qkv)
        if config.target_modules == "all-linear":
            hit = (_is_linear_like(module) or isinstance(module, LoraLinear)) and name not in heads
        else:
            hit = fused or _names_match(name, config.target_modules)
        if not hit or _names_match(name, config.exclude_modules):
            continue
        if not (_is_candidate(module) or isinstance(module, LoraLayer)):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, which LoRA cannot wrap (Linear, Conv1D, Conv2d, "
                "Embedding or a 4-bit linear); name its inner layers instead"
            )
        targets.append((name, module))
    if not targets:
        names = _short_names([n for n, _ in candidates])
        raise ValueError(
            f"target_modules={config.target_modules!r} (fused_qkv={list(config.fused_qkv)}) matched no module of "
            f"{type(model).__name__}. Candidate layer names: {names}"
        )
    return targets


def _prefixes(name: str, saved_key: str) -> list[str]:
    """Full names of the module_to_save that ``name`` lies inside (so its inner layers are not adapted)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if _suffix_match(".".join(parts[:i]), saved_key)]


def _wrap(module: nn.Module) -> LoraLayer:
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    return LoraLinear(module)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place; it becomes the only active, trainable adapter."""
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name {adapter_name!r} must be non-empty and contain no '.' (it is part of parameter names)")
    configs = getattr(model, "lora_configs", None) or {}
    if adapter_name in configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r}; delete_adapter it or pick another name")
    if config.target_modules is None and not config.fused_qkv:
        raise ValueError("LoraConfig.target_modules is None: name the layers to adapt, e.g. ['query', 'value']")
    # Plan and check everything first, so that a bad config leaves the model untouched.
    plan = []
    for name, module in _find_targets(model, config):
        enable = next((v for k, v in config.fused_qkv.items() if _suffix_match(name, k)), None)
        if enable is not None:
            if not isinstance(module, LoraLinear) and not _is_linear_like(module):
                raise ValueError(f"fused_qkv target {name!r} is a {type(module).__name__}, not a linear layer")
            conv1d = not isinstance(module, LoraLinear) and base_kind(module) == "conv1d"
            out = module.weight.shape[1] if conv1d else module.out_features
            if out % len(enable):
                raise ValueError(f"fused_qkv[{name!r}]: out_features {out} is not divisible into {len(enable)} slices")
        plan.append((name, module, enable))
    _check_patterns(config, [name for name, _, _ in plan])
    saved = []
    for key in config.modules_to_save or []:
        found = [(n, m) for n, m in _leaf_modules(model) if n and _suffix_match(n, key)]
        if not found:
            raise ValueError(f"modules_to_save entry {key!r} matches no module of {type(model).__name__}")
        saved += found
    for name, module, enable in plan:
        layer = module if isinstance(module, LoraLayer) else _wrap(module)
        layer.update_layer(
            adapter_name,
            r=_first_match(name, config.rank_pattern, config.r, "rank_pattern"),
            lora_alpha=_first_match(name, config.alpha_pattern, config.lora_alpha, "alpha_pattern"),
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            enable=enable,
        )
        if layer is not module:
            _set_submodule(model, name, layer)
    for name, module in saved:
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        wrapper.add(adapter_name)
        if wrapper is not module:
            _set_submodule(model, name, wrapper)
    configs[adapter_name] = config
    model.lora_configs = configs
    set_adapter(model, adapter_name)
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def _saved_wrappers(model: nn.Module) -> list[ModulesToSaveWrapper]:
    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def _check_names(model: nn.Module, names: list[str]) -> None:
    known = list(getattr(model, "lora_configs", {}) or {})
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"no adapter named {missing} in the model (adapters: {known})")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the active adapters and the only trainable parameters (plus their saved modules/biases)."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for _, layer in lora_modules(model):
        layer.set_adapter(names)
    for wrapper in _saved_wrappers(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners} each have their own copy of a module_to_save; activate one at a time")
        wrapper.active_adapter = owners[0] if owners else None
    mark_trainable(model, names)


def mark_trainable(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Freeze everything, then unfreeze the adapter's A/B, its modules_to_save copies and biases per ``bias``."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    _check_names(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        bias = model.lora_configs[name].bias
        for _, layer in lora_modules(model):
            if name not in layer.r:
                continue
            for attr in layer.adapter_attrs:
                part = getattr(layer, attr)[name] if name in getattr(layer, attr) else None
                for p in [part] if isinstance(part, nn.Parameter) else (part.parameters() if part is not None else []):
                    p.requires_grad_(True)
            if bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
        for wrapper in _saved_wrappers(model):
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(True)
        if bias == "all":
            for pname, p in model.named_parameters():
                if pname.split(".")[-1] == "bias" and ".original_module." not in f".{pname}":
                    p.requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    _check_names(model, [adapter_name])
    for _, layer in lora_modules(model):
        layer.delete_adapter(adapter_name)
    for wrapper in _saved_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
        if wrapper.active_adapter == adapter_name:
            wrapper.active_adapter = None
    del model.lora_configs[adapter_name]


@contextmanager
def disable_adapters(model: nn.Module):
    """Temporarily the base model: merged adapters are unmerged, branches skipped; restored on exit.
    A model without LoRA layers (full fine-tuning, BitFit) is left as it is."""
    layers = [layer for _, layer in lora_modules(model)]
    state = [(layer, layer.adapters_disabled, list(layer.merged_adapters)) for layer in layers]
    wrappers = [(w, w.disabled) for w in _saved_wrappers(model)]
    try:
        for layer in layers:
            if layer.merged_adapters:
                layer.unmerge()
            layer.adapters_disabled = True
        for w, _ in wrappers:
            w.disabled = True
        yield model
    finally:
        for layer, disabled, merged in state:
            layer.adapters_disabled = disabled
            if merged and not layer.merged_adapters:
                layer.merge(merged)
        for w, disabled in wrappers:
            w.disabled = disabled


def merge_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights; merging one twice raises."""
    if names is not None:
        _check_names(model, names)
    for _, layer in lora_modules(model):
        layer.merge(layer.active_adapters if names is None else [n for n in names if n in layer.r])


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in lora_modules(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Take the wrappers out, as PEFT's ``unload`` / ``merge_and_unload`` do.

    Each LoRA layer becomes its base module: adapters already merged stay in its weights, unmerged ones
    are dropped (``merge=True`` first merges the active ones). Each modules_to_save wrapper becomes the
    active adapter's trained copy (the original only where no adapter with a copy is active), with or
    without ``merge``: so ``merge_adapters(model); unload(model)`` equals ``unload(model, merge=True)``.
    For the untouched base head, ``delete_adapter`` first. Parameters keep their requires_grad.
    """
    if merge:
        for _, layer in lora_modules(model):
            layer.merge([n for n in layer.active_adapters if n not in layer.merged_adapters])
    for name, layer in list(lora_modules(model)):
        _set_submodule(model, name, layer.base_layer)
    for name, wrapper in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
        copies = wrapper.modules_to_save
        # not wrapper.active_module: a disable_adapters() block in progress must not pick the head
        keep = copies[wrapper.active_adapter] if wrapper.active_adapter in copies else wrapper.original_module
        _set_submodule(model, name, keep)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). A quantized base counts as in_features x out_features weights, not its packed bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():  # packed 4-bit weights (a buffer or a uint8 parameter) count as in x out
        w = getattr(m, "weight", None)
        if not isinstance(m, (LoraLayer, ModulesToSaveWrapper)) and hasattr(m, "dequantize") and w is not None:
            total += m.in_features * m.out_features - (w.numel() if isinstance(w, nn.Parameter) else 0)
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"
