"""Adapter files in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT: the in-memory ``<path>.lora_A.<adapter>.weight`` is stored as
``base_model.model.<path>.lora_A.weight`` (likewise lora_B, lora_embedding_A/B), a module_to_save copy
``<path>.modules_to_save.<adapter>.<p>`` as ``base_model.model.<path>.<p>``, and trained biases under
their own names. So an adapter trained here loads in PEFT and a PEFT adapter loads here.

Fused per-slice adapters (``fused_qkv``) have no PEFT equivalent; they are saved in loralab's form
(``loralab_fused_qkv`` in the config, lora_A of shape (r·k) x in, lora_B (d·k) x r). ``export_peft``
rewrites them as an exactly equivalent plain PEFT adapter of rank r·k: A' = A_cat and B' the (out x r·k)
block matrix with B_i in (slice i's rows, adapter i's columns) and zeros elsewhere, alpha' chosen so
alpha'/r' equals the original scaling. Then B'A' x = concat over slices of (B_i A_i x or 0) exactly.

Loading reads safetensors only (never unpickles) and fails loudly on a base without the target modules,
missing or unexpected keys, shape mismatches, and config fields this version does not know.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.core.config import LoraConfig
from loralab.core.inject import _leaf_modules, _suffix_match, inject_adapter, lora_modules, mark_trainable

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT LoraConfig fields loralab accepts when they hold PEFT's neutral default (anything else is refused:
# the adapter would not mean the same thing here).
PEFT_NEUTRAL = {
    "peft_type": "LORA", "fan_in_fan_out": None, "inference_mode": None, "revision": None, "auto_mapping": None,
    "layers_to_transform": None, "layers_pattern": None, "use_dora": False, "lora_bias": False,
    "megatron_config": None, "megatron_core": None, "loftq_config": {}, "layer_replication": None,
    "eva_config": None, "corda_config": None, "runtime_config": None, "target_parameters": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None, "arrow_config": None,
    "ensure_weight_tying": None, "peft_version": None, "use_qalora": False, "qalora_group_size": None,
    "kasa_config": None, "lora_ga_config": None, "monteclora_config": None, "use_bdlora": None,
    "velora_config": None,
}
ANY_VALUE = {"fan_in_fan_out", "inference_mode", "revision", "auto_mapping", "megatron_core", "peft_version",
             "qalora_group_size", "ensure_weight_tying"}
FUSED_KEY = "loralab_fused_qkv"
# Parameter-name components of adapter tensors (everything else in a file must be a trained bias).
ADAPTER_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save")


def _file_key(param_name: str, adapter: str) -> str | None:
    """In-memory parameter name -> PEFT file key, or None when it belongs to another adapter."""
    parts = param_name.split(".")
    for marker in ADAPTER_MARKERS:
        if marker in parts:
            i = parts.index(marker)
            if parts[i + 1] != adapter:
                return None
            keep = parts[:i] + ([marker] if marker != "modules_to_save" else []) + parts[i + 2:]
            return PREFIX + ".".join(keep)
    return PREFIX + param_name


def _has_adapter(model: nn.Module, adapter: str) -> None:
    if adapter not in (getattr(model, "lora_configs", None) or {}):
        known = list(getattr(model, "lora_configs", None) or {})
        raise KeyError(f"the model has no adapter {adapter!r} (adapters: {known})")


def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT file keys: A/B, modules_to_save copies, biases per ``bias``."""
    _has_adapter(model, adapter)
    cfg: LoraConfig = model.lora_configs[adapter]
    out = {}
    lora_paths = {name for name, _ in lora_modules(model)}
    for name, p in model.named_parameters():
        parts = name.split(".")
        is_adapter = any(m in parts for m in ADAPTER_MARKERS)
        is_bias = parts[-1] == "bias" and not is_adapter and "original_module" not in parts
        if is_bias and cfg.bias == "lora_only":
            is_bias = name.removesuffix(".base_layer.bias") in lora_paths and name.endswith(".base_layer.bias")
        if not (is_adapter or (is_bias and cfg.bias != "none")):
            continue
        key = _file_key(name, adapter)
        if key is not None:
            out[key] = p.detach().to("cpu").contiguous()
    return out


def _config_json(model: nn.Module, cfg: LoraConfig) -> dict:
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "fused_qkv"}
    d["peft_type"] = "LORA"
    d["fan_in_fan_out"] = any(layer.__dict__.get("kind") == "conv1d" for _, layer in lora_modules(model))
    d["inference_mode"] = True
    if isinstance(d["target_modules"], (set, tuple)):
        d["target_modules"] = sorted(d["target_modules"])
    if cfg.fused_qkv:
        d[FUSED_KEY] = cfg.fused_qkv
        # fused names must stay targets for a re-injection to find them
        tm = d["target_modules"] or []
        if isinstance(tm, list):
            d["target_modules"] = tm + [k for k in cfg.fused_qkv if k not in tm]
    return d


def _atomic_write_dir(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp_w = directory / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c = directory / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    # Top-level keys sorted; nested dicts keep their order: rank_pattern / alpha_pattern are first-match
    # lists (PEFT's rule), which sort_keys=True would reorder and so change which key wins on reload.
    tmp_c.write_text(json.dumps({k: config[k] for k in sorted(config)}, indent=2))
    os.replace(tmp_w, directory / WEIGHTS_NAME)
    os.replace(tmp_c, directory / CONFIG_NAME)


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (each file replaced atomically)."""
    _has_adapter(model, adapter_name)
    directory = Path(directory)
    _atomic_write_dir(directory, _config_json(model, model.lora_configs[adapter_name]),
                      adapter_state_dict(model, adapter_name))
    return directory


def read_config_json(directory: str | Path) -> dict:
    """The adapter_config.json of a saved adapter or method directory as a dict; a missing, damaged or
    non-object file is a clear error."""
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is this an adapter directory?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid UTF-8 JSON ({err}): the file is damaged; restore it or "
                               "save the adapter again") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(raw).__name__}, not an object of adapter settings; "
                               "restore it or save the adapter again")
    return raw


def read_config(directory: str | Path) -> LoraConfig:
    """Parse an adapter_config.json (ours or PEFT's) into a LoraConfig, refusing what we cannot honour."""
    path = Path(directory) / CONFIG_NAME
    raw = read_config_json(directory)
    ours = {f.name for f in fields(LoraConfig)}
    kwargs = {}
    for key, value in raw.items():
        if key in ours and key != "fused_qkv":
            kwargs[key] = value
        elif key == FUSED_KEY:
            kwargs["fused_qkv"] = value
        elif key in PEFT_NEUTRAL:
            if key == "peft_type" and value != "LORA":
                raise ValueError(f"{path}: peft_type={value!r}; loralab loads LORA adapters only")
            if key not in ANY_VALUE and value not in (PEFT_NEUTRAL[key], None, False, {}, []):
                raise ValueError(f"{path}: {key}={value!r} is a PEFT feature loralab does not implement; "
                                 "the adapter would not compute the same function here")
        else:
            raise ValueError(f"{path}: unknown config field {key!r} (written by a newer PEFT/loralab?); "
                             "upgrade loralab or remove the field if you know it is harmless")
    if isinstance(kwargs.get("target_modules"), list):
        kwargs["target_modules"] = sorted(set(kwargs["target_modules"]))
    if kwargs.get("modules_to_save"):  # PEFT appends its task head defaults ("classifier", "score")
        kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{path}: settings this loralab cannot use ({err}); restore the file or save the "
                               "adapter again") from None


class AdapterFileError(ValueError):
    """An adapter directory is damaged or holds something loralab will not load (a pickle)."""


def check_adapter_files(directory: str | Path, heads_required: bool = True
                        ) -> tuple[LoraConfig, dict[str, tuple[int, ...]]]:
    """Validate an adapter dir before anything is built from it: its config parses, its weights are a
    complete safetensors file (never a pickle: ``adapter_model.bin`` is refused unopened), and every
    ``modules_to_save`` head it lists is in the file (``heads_required``; a warm start for another label
    count re-creates the head on purpose). Returns (config, {file key: shape})."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter dir {directory} not found (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{directory} holds adapter_model.bin, a pickle, and no {WEIGHTS_NAME}: loralab never unpickles "
                "(loading a pickle can run any code). Convert it where you trust it: "
                "safetensors.torch.save_file(torch.load('adapter_model.bin', weights_only=True), "
                f"'{WEIGHTS_NAME}')")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}: the adapter's weights are missing")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            broken = [k for k in f.keys() if f.get_slice(k).get_dtype() not in ("I64", "I32", "I16", "I8", "U8", "BOOL")
                      and not bool(torch.isfinite(f.get_tensor(k)).all())]
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{weights} is not a readable safetensors file ({err}): it is truncated or damaged; "
                               "restore it or save the adapter again") from None
    if broken:
        raise AdapterFileError(f"{weights}: {len(broken)} tensor(s) hold NaN/Inf (e.g. {broken[0]}): the training that "
                               "saved it diverged, so it computes no usable output; retrain with a lower train.lr")
    listed = list(dict.fromkeys(cfg.modules_to_save or []))
    if heads_required and listed and not any(_under_module(k, entry) for k in shapes for entry in listed):
        raise AdapterFileError(
            f"{weights} holds no tensor of its head (modules_to_save {listed}): evaluating or merging it would use "
            "a freshly initialised head. Restore the adapter, or pass --allow-fresh-head if that is what you want")
    return cfg, shapes


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                 trainable: bool = True) -> nn.Module:
    """Inject the adapter saved in ``directory`` and load its weights exactly.

    ``trainable=True`` (the default, for warm starts) leaves the loaded A/B and saved modules trainable;
    ``False`` freezes them for inference. Raises on any missing/unexpected key or shape mismatch.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        pickled = [p.name for p in directory.glob("adapter_model.bin")]
        hint = " (found adapter_model.bin: loralab never unpickles; convert it to safetensors)" if pickled else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{hint}")
    cfg = read_config(directory)
    if getattr(model, "lora_configs", None) and adapter_name in model.lora_configs:
        raise ValueError(f"the model already has an adapter {adapter_name!r}; load under another adapter_name")
    saved = load_file(str(weights))
    cfg.modules_to_save = _modules_to_save_in_file(model, cfg.modules_to_save, saved, directory)
    inject_adapter(model, cfg, adapter_name)
    expected = {}
    for name, p in model.named_parameters():
        key = _file_key(name, adapter_name)
        if key is None:
            continue
        parts = name.split(".")
        trained_bias = cfg.bias != "none" and parts[-1] == "bias" and "original_module" not in parts
        if any(m in parts for m in ADAPTER_MARKERS) or (trained_bias and key in saved):
            expected[key] = p
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"adapter {directory} does not fit this {type(model).__name__}: missing keys "
                         f"{missing[:6]}{'…' if len(missing) > 6 else ''}, unexpected keys "
                         f"{unexpected[:6]}{'…' if len(unexpected) > 6 else ''}")
    with torch.no_grad():
        for key, p in expected.items():
            t = saved[key]
            if tuple(t.shape) != tuple(p.shape):
                module = key.removeprefix(PREFIX)
                raise ValueError(f"adapter {directory}: {module} has shape {tuple(t.shape)} in the file but "
                                 f"{tuple(p.shape)} in the model (different rank, base model or fused layout?)")
            p.copy_(t.to(p.dtype))
    if trainable:
        mark_trainable(model, adapter_name)
        for key, p in expected.items():  # trained biases saved with the adapter train on too
            p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _under_module(key: str, module_suffix: str) -> bool:
    """Whether file ``key`` is a tensor inside a module named ``module_suffix`` (at any depth: RoBERTa's
    classifier holds ``dense`` and ``out_proj``, so its tensors are ``classifier.dense.weight`` etc.)."""
    return key.startswith(PREFIX) and re.search(rf"(^|\.){re.escape(module_suffix)}\.", key[len(PREFIX):]) is not None


def _modules_to_save_in_file(model: nn.Module, names: list[str] | None, saved: dict[str, torch.Tensor],
                             directory: Path) -> list[str] | None:
    """The ``modules_to_save`` entries the adapter file really carries.

    PEFT writes its task's default head names into the config whether the model has them or not
    (SEQ_CLS: "classifier" and "score"), so an entry naming no module of ``model`` and no tensor of the
    file is dropped. An entry naming a module of ``model`` but no tensor of the file is refused: loading
    would silently keep the untrained head.
    """
    keep = []
    for entry in dict.fromkeys(names or []):
        in_model = [n for n, _ in _leaf_modules(model) if n and _suffix_match(n, entry)]
        in_file = any(_under_module(k, entry) for k in saved)
        if in_model and not in_file:
            raise ValueError(f"adapter {directory}: modules_to_save entry {entry!r} is {in_model} in this "
                             f"{type(model).__name__}, but {WEIGHTS_NAME} holds no tensor under it; the file "
                             "does not belong to this model, or was saved without its head")
        if in_file:
            keep.append(entry)  # a name the model lacks fails in inject_adapter, naming the entry
    return keep or None


def export_peft(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> Path:
    """Save a plain-PEFT adapter equivalent to ``adapter_name``; fused per-slice layers become rank r·k."""
    _has_adapter(model, adapter_name)
    cfg: LoraConfig = model.lora_configs[adapter_name]
    tensors = adapter_state_dict(model, adapter_name)
    config = _config_json(model, cfg)
    config.pop(FUSED_KEY, None)
    rank_pattern, alpha_pattern = {}, {}  # the exact per-layer keys go first: PEFT takes the first match
    for name, layer in lora_modules(model):
        enable = getattr(layer, "enable", {}).get(adapter_name)
        if enable is None:
            continue
        r, k = layer.r[adapter_name], sum(enable)
        d = layer.out_features // len(enable)
        A, B = layer.lora_A[adapter_name].weight.detach(), layer.lora_B[adapter_name].weight.detach()
        big_B = B.new_zeros(layer.out_features, r * k)
        for i, slot in enumerate(j for j, on in enumerate(enable) if on):
            big_B[slot * d:(slot + 1) * d, i * r:(i + 1) * r] = B[i * d:(i + 1) * d]
        tensors[PREFIX + name + ".lora_B.weight"] = big_B.contiguous()
        tensors[PREFIX + name + ".lora_A.weight"] = A.contiguous()
        alpha = layer.lora_alpha[adapter_name]
        key = re.escape(name)  # a full-name regex: matches this layer only, here and in PEFT
        rank_pattern[key] = r * k
        alpha_pattern[key] = alpha * (math.sqrt(k) if cfg.use_rslora else k)  # keeps alpha'/r' == scaling
    config["rank_pattern"] = {**rank_pattern, **{k: v for k, v in cfg.rank_pattern.items() if k not in rank_pattern}}
    config["alpha_pattern"] = {**alpha_pattern, **{k: v for k, v in cfg.alpha_pattern.items() if k not in alpha_pattern}}
    _atomic_write_dir(Path(directory), config, tensors)
    return Path(directory)
