"""What trains, for every experiment: LoRA (fresh or warm-started), full fine-tuning, BitFit, a linear
probe, or one of the paper's other baselines built by ``core.methods`` (adapters, prefixes, top layers).

Trainable parameters (L layers, hidden d, FFN width I, head P parameters):
    lora   : per adapted d_in -> d_out projection r (d_in + d_out)  (A: r x d_in, B: d_out x r) + P
    bitfit : every ``*.bias`` + P
    linear_probe : P (the head only)
    full   : every parameter
    adapter_h / adapter_l / adapter_p : L̂_Adpt (2 d r + r + d) + 2 L̂_LN d + P  (Hu et al. Sec. 5.1; r = lora.r;
             L̂_Adpt = 2L, L or L; L̂_LN = 0, L or 0; adapter_h with lora.adapter_layernorm: its layers' LayerNorms)
    prefix_layer : 2 L d_kv l_p + P (keys and values; Hu et al. count L d l_p), or the reparametrisation MLP
    prefix_embed : d (l_p + l_i) + P
    ft_top2 : the last lora.top_layers transformer layers + P
``heads`` (a classifier, a span head) always train, and with LoRA they are saved with the adapter
(``modules_to_save``), so the adapter dir alone reproduces the model; the core methods save them with
their own tensors (``core.methods.save_method``).

The config's default targets ``["query", "value"]`` mean the paper's W_q and W_v in the architecture's
own names: BERT/RoBERTa ``query``/``value``, MPNet ``q``/``v``, DistilBERT ``q_lin``/``v_lin``,
Llama-style ``q_proj``/``v_proj``, GPT-2 the q and v slices of the fused ``c_attn``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.core import methods as core_methods
from loralab.core.adapter_io import PREFIX, load_adapter, read_config_json
from loralab.core.blocks import QV_NAMES
from loralab.core.inject import count_parameters, inject_adapter

CORE_METHODS = ("bitfit", "adapter_h", "adapter_l", "adapter_p", "prefix_layer", "prefix_embed", "ft_top2")
"""Methods applied, counted, saved and loaded by ``core.methods``."""
METHODS = ("lora", "full", "linear_probe", *CORE_METHODS)
DEFAULT_TARGETS = ["query", "value"]
GPT2_FUSED_QV = {"c_attn": [True, False, True]}


def log(msg: str) -> None:
    print(f"[setup] {msg}", file=sys.stderr, flush=True)


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def check_heads(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` if each is a submodule of ``model``, else an error listing the top-level modules."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no head module(s) {missing} (top-level modules: "
                         f"{[n for n, _ in model.named_children()]}); set lora.modules_to_save to its head")
    return list(names)


def qv_targets(model: nn.Module, lora: Any) -> tuple[list[str] | str | None, dict[str, list[bool]]]:
    """(target_modules, fused_qkv) with the default ["query", "value"] translated to the architecture's
    W_q, W_v (module docstring); anything else the user wrote is kept as written."""
    requested, fused = lora.target_modules, {k: list(v) for k, v in lora.fused_qkv.items()}
    if not (isinstance(requested, list) and requested == DEFAULT_TARGETS):
        return requested, fused
    if fused:
        return None, fused  # only the fused projections the user named
    kind = model_type(model)
    if kind == "gpt2":
        targets: list[str] | None = None
        fused = {k: list(v) for k, v in GPT2_FUSED_QV.items()}
    else:
        targets = QV_NAMES.get(kind, DEFAULT_TARGETS)
    if (targets, fused) != (DEFAULT_TARGETS, {}):
        log(f"lora targets for {kind or type(model).__name__}: {fused or targets} (W_q and W_v, as in the paper)")
    return targets, fused


def apply_method(model: nn.Module, lora: Any, task_type: str, heads: list[str] | None = None,
                 base_model_name: str | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Set what trains (in place) per the run's ``lora`` section; return {"method", "trainable", "total",
    "by_kind" (``core.methods.count_by_kind``), "heads", ...} (+ "warm_start", the LoRA settings, or a core
    method's "settings" and "formula": its count terms, e.g. adapters' "paper" count). ``heads`` always train.
    ``tokenizer``: the model's, for ``lora.prefix_init_text`` (an experiment that passes none refuses it)."""
    method = lora.method
    if method not in METHODS:
        raise ValueError(f"lora.method must be one of {METHODS}, got {method!r}")
    heads = check_heads(model, heads or [])
    info: dict[str, Any] = {"method": method, "heads": heads}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "linear_probe":
        if not heads:
            raise ValueError("lora.method=linear_probe trains only the head: name it in lora.modules_to_save")
        model.requires_grad_(False)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
    elif method in CORE_METHODS:
        info.update(_apply_core(model, lora, heads))
        if method == "prefix_layer" and not lora.prefix_reparam and lora.prefix_init_text is not None:
            info["prefix_init"] = _init_prefixes(model, lora, tokenizer)
    elif lora.init_from:
        info["warm_start"] = warm_start(model, lora.init_from, heads)
    else:
        targets, fused = qv_targets(model, lora)
        cfg = lora.to_lora_config(task_type=task_type, base_model_name_or_path=base_model_name)
        cfg.target_modules, cfg.fused_qkv = targets, fused
        cfg.modules_to_save = heads or (list(lora.modules_to_save) if lora.modules_to_save else None)
        inject_adapter(model, cfg, adapter_name="default")
        info.update(target_modules=targets, fused_qkv=fused, modules_to_save=cfg.modules_to_save, r=cfg.r,
                    lora_alpha=cfg.lora_alpha)
        check_heads_train(model, heads)
    info["trainable"], info["total"] = count_parameters(model)
    info["by_kind"] = core_methods.count_by_kind(model)["by_kind"]
    if info["trainable"] == 0:
        raise RuntimeError(f"lora.method={method}: no parameter trains")
    log(f"{method}: trainable {info['trainable']:,} of {info['total']:,} parameters "
        f"({100 * info['trainable'] / max(1, info['total']):.3f}%)")
    return info


def _init_prefixes(model: nn.Module, lora: Any, tokenizer: Any) -> dict[str, Any]:
    """``lora.prefix_init_text``'s tokens, cycled to l_p, through ``core.prefix.init_prefixes_from_tokens``."""
    import torch

    from loralab.core.prefix import init_prefixes_from_tokens

    text = lora.prefix_init_text
    if tokenizer is None:
        raise ValueError("lora.prefix_init_text: this experiment gives no tokenizer to tokenize it with; remove it")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"lora.prefix_init_text={text!r} has no tokens; give a non-empty text")
    tokens = [ids[i % len(ids)] for i in range(lora.prefix_length)]
    init_prefixes_from_tokens(model, torch.tensor(tokens))
    log(f"prefix_layer: prefixes initialised from the activations of {text!r} ({len(ids)} tokens, cycled to "
        f"l_p = {lora.prefix_length})")
    return {"text": text, "tokens": tokens}


def method_settings(lora: Any) -> dict[str, Any]:
    """The ``core.methods.apply_method`` settings of a core method from the run's ``lora`` section
    (only the fields the method reads: ``LoraSection.METHOD_KEYS``)."""
    method = lora.method
    if method == "bitfit":
        return {}
    if method.startswith("adapter_"):
        settings: dict[str, Any] = {"r": lora.r, "activation": lora.adapter_activation}
        if method == "adapter_h":
            settings["train_layernorm"] = lora.adapter_layernorm
        return settings
    if method == "prefix_layer":
        settings = {"l_p": lora.prefix_length, "reparam": lora.prefix_reparam}
        if settings["reparam"]:
            settings.update(reparam_dim=lora.prefix_reparam_dim, reparam_hidden=lora.prefix_reparam_hidden)
        return settings
    if method == "prefix_embed":
        return {"l_p": lora.prefix_length, "l_i": lora.infix_length}
    if method == "ft_top2":
        return {"k": lora.top_layers}
    raise ValueError(f"{method!r} is not a core method ({CORE_METHODS})")


def _apply_core(model: nn.Module, lora: Any, heads: list[str]) -> dict[str, Any]:
    """A core method, fresh or warm-started from ``lora.init_from``; the heads train (and are saved)."""
    settings = method_settings(lora)
    if lora.init_from:
        info: dict[str, Any] = {"warm_start": warm_start_method(model, lora.init_from, lora.method, heads, settings)}
        info["settings"] = info["warm_start"]["settings"]
    else:
        applied = core_methods.apply_method(model, lora.method, head=list(heads), **settings)
        info = {"settings": {**settings, "head": list(heads)}, "formula": applied["formula"]}
    check_heads_train(model, heads)
    return info


def check_heads_train(model: nn.Module, heads: list[str]) -> None:
    for name in heads:
        params = [p for n, p in model.named_parameters() if n == name or n.startswith(name + ".")]
        if not params or not any(p.requires_grad for p in params):
            raise RuntimeError(f"head {name!r} is frozen after LoRA injection: a head must train")


# ---------------------------------------------------------------- warm start


def warm_start(model: nn.Module, adapter_dir: str | Path, heads: list[str]) -> dict[str, Any]:
    """Inject the adapter saved in ``adapter_dir`` as "default", trainable, and verify that its LoRA
    weights arrived trainable and equal to the file.

    The saved head is loaded when its shapes fit this model's head. A head saved for another label
    count (MNLI: 3, RTE: 2, STS-B: 1) is replaced by this model's freshly initialised head, which then
    trains and is saved with the adapter (logged). r, alpha and targets come from the adapter's
    adapter_config.json and are returned, so the run records what actually trained."""
    from safetensors.torch import load_file, save_file

    src = Path(adapter_dir)
    weights = src / "adapter_model.safetensors"
    if not weights.is_file() or not (src / "adapter_config.json").is_file():
        raise FileNotFoundError(f"lora.init_from={str(src)!r}: expected adapter_config.json and "
                                f"adapter_model.safetensors in {src.resolve()}")
    saved_method = read_config_json(src).get("method", "lora")
    if saved_method != "lora":
        raise ValueError(f"lora.init_from={str(src)!r} holds a saved {saved_method!r} method, not LoRA adapters, "
                         f"and lora.method is 'lora': set lora.method={saved_method} to train or evaluate it. "
                         f"It cannot be merged into the base weights as LoRA can: {merge_refusal(saved_method)}")
    state = load_file(str(weights))
    fresh = {f"{PREFIX}{h}.{n}": p.detach().clone() for h in heads
             for n, p in model.get_submodule(h).named_parameters()}
    saved_head = {k: tuple(v.shape) for k, v in state.items() if k in fresh}
    fits = saved_head.keys() == fresh.keys() and all(saved_head[k] == tuple(fresh[k].shape) for k in fresh)
    info: dict[str, Any] = {"init_from": str(src.resolve()), "head_loaded": fits}
    if fits:
        load_adapter(model, src, adapter_name="default", trainable=True)
    else:
        log(f"warm start from {src}: its head {heads} has shapes {sorted(saved_head.values()) or 'none saved'}, "
            f"this task needs {sorted(tuple(v.shape) for v in fresh.values())}; the head is re-created (fresh "
            "init), the LoRA weights are loaded")
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg["modules_to_save"] = heads
        lora_only = {k: v for k, v in state.items() if "lora_" in k}
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "adapter_config.json").write_text(json.dumps(cfg))
            save_file({**lora_only, **fresh}, str(Path(tmp) / weights.name))
            load_adapter(model, tmp, adapter_name="default", trainable=True)
    _verify_loaded(model, state)
    check_heads_train(model, heads)
    lora_cfg = model.lora_configs["default"]
    info.update(r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha, target_modules=lora_cfg.target_modules)
    log(f"warm start from {src}: LoRA r={lora_cfg.r} alpha={lora_cfg.lora_alpha} on {lora_cfg.target_modules} "
        f"loaded trainable; head {'loaded' if fits else 're-created'}")
    return info


def _verify_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loud check: every saved LoRA matrix is in the model, equal to the file, and trainable."""
    params = dict(model.named_parameters())
    n = 0
    for key, value in state.items():
        if "lora_" not in key:
            continue
        stem, kind = key.removeprefix(PREFIX).rsplit(".", 1)  # "...query.lora_A", "weight"
        name = f"{stem}.default.{kind}"
        if name not in params:
            raise RuntimeError(f"warm start: saved {key} has no parameter {name} in the model")
        p = params[name]
        if not p.requires_grad:
            raise RuntimeError(f"warm start: {name} was loaded frozen")
        if not torch.equal(p.detach().to(value.dtype).cpu(), value):
            raise RuntimeError(f"warm start: {name} differs from the saved {key}")
        n += 1
    if n == 0:
        raise RuntimeError("warm start: the adapter file holds no LoRA weights")


# ---------------------------------------------------------------- the core methods' saved dirs


def merge_refusal(method: str) -> str:
    """Why a saved ``method`` dir does not merge like LoRA: the core's own error for adapters and prefixes."""
    from loralab.core import adapters, prefix, prefix_embed

    refuse = {"prefix_layer": prefix.merge_prefixes, "prefix_embed": prefix_embed.merge_prefix_embedding}
    fn = adapters.merge_adapters if method.startswith("adapter_") else refuse.get(method)
    if fn is None:
        return (f"{method} trains the model's own weights, so there is nothing to fold in: the trained model "
                "is the base with the saved tensors loaded (load_method) and saved whole")
    try:
        fn(None)
    except NotImplementedError as err:
        return str(err)
    raise AssertionError(f"core merge of {method} did not refuse")  # pragma: no cover


def warm_start_method(model: nn.Module, adapter_dir: str | Path, method: str, heads: list[str],
                      settings: dict[str, Any]) -> dict[str, Any]:
    """Load a core method saved by ``core.methods.save_method`` (its ``adapter_config.json`` names the
    method) onto ``model``, trainable, and verify every saved tensor arrived equal and trainable.

    The dir's method must be ``method``; its settings (r, l_p, ...) are the file's and are returned (a
    difference from the run's section is logged). A head saved with other shapes (another label count)
    is replaced by this model's fresh head, as the LoRA warm start does."""
    from safetensors.torch import load_file, save_file

    src = Path(adapter_dir)
    weights, config_path = src / core_methods.WEIGHTS_NAME, src / core_methods.CONFIG_NAME
    if not weights.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"lora.init_from={str(src)!r}: expected {core_methods.CONFIG_NAME} and "
                                f"{core_methods.WEIGHTS_NAME} in {src.resolve()}")
    config = read_config_json(src)
    saved_method = config.get("method", "lora")
    if saved_method != method:
        raise ValueError(f"lora.init_from={str(src)!r} holds a saved {saved_method!r} method but lora.method is "
                         f"{method!r}: set lora.method={saved_method}")
    state = load_file(str(weights))
    saved_heads = list(config.get("head") or [])
    fresh = {f"{h}.{n}": p.detach().clone() for h in heads for n, p in model.get_submodule(h).named_parameters()}
    in_head = [k for k in state if any(k.startswith(h + ".") for h in set(saved_heads) | set(heads))]
    fits = sorted(in_head) == sorted(fresh) and all(tuple(state[k].shape) == tuple(fresh[k].shape) for k in fresh)
    body = {k: v for k, v in state.items() if k not in in_head}
    config["head"] = list(heads)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / core_methods.CONFIG_NAME).write_text(json.dumps(config))
        save_file({**body, **({k: state[k] for k in in_head} if fits else fresh)}, str(Path(tmp) / weights.name))
        core_methods.load_method(model, tmp, trainable=True)
    params = dict(model.named_parameters())
    for key, value in body.items():
        if key not in params or not params[key].requires_grad:
            raise RuntimeError(f"warm start: saved {key} is {'frozen' if key in params else 'not'} in the model")
        if not torch.equal(params[key].detach().to(value.dtype).cpu(), value):
            raise RuntimeError(f"warm start: {key} differs from the file")
    if not body:
        raise RuntimeError(f"warm start: {weights} holds no {method} tensors besides the head")
    loaded = {k: v for k, v in config.items() if k not in ("method", "merged_reparametrization")}
    differs = {k: (settings[k], loaded.get(k)) for k in settings if loaded.get(k) != settings[k]}
    if differs:
        log(f"warm start from {src}: the saved {method} has " + ", ".join(f"{k}={v[1]} (the config says {v[0]})"
                                                                            for k, v in differs.items())
            + "; the saved settings are used")
    if not fits:
        log(f"warm start from {src}: its head {saved_heads} does not fit this task's {heads}; the head is "
            f"re-created (fresh init), the {method} tensors are loaded")
    log(f"warm start from {src}: {method} {loaded} loaded trainable; head {'loaded' if fits else 're-created'}")
    return {"init_from": str(src.resolve()), "head_loaded": fits, "settings": loaded,
            "merged_reparametrization": bool(config.get("merged_reparametrization"))}
