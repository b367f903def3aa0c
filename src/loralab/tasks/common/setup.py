"""What trains, for every experiment: LoRA (fresh or warm-started), full fine-tuning, or BitFit.

Trainable parameters (L layers, hidden H, FFN width I, head P parameters):
    lora   : per adapted d_in -> d_out projection r (d_in + d_out)  (A: r x d_in, B: d_out x r) + P
    bitfit : every ``*.bias`` + P
    linear_probe : P (the head only)
    full   : every parameter
``heads`` (a classifier, a span head) always train, and with LoRA they are saved with the adapter
(``modules_to_save``), so the adapter dir alone reproduces the model.

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

from loralab.core.adapter_io import PREFIX, load_adapter
from loralab.core.inject import count_parameters, inject_adapter

METHODS = ("lora", "full", "bitfit", "linear_probe")
DEFAULT_TARGETS = ["query", "value"]
QV_NAMES: dict[str, list[str]] = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"], "electra": ["query", "value"], "albert": ["query", "value"],
    "mpnet": ["q", "v"], "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
}
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
                 base_model_name: str | None = None) -> dict[str, Any]:
    """Set what trains (in place) per the run's ``lora`` section; return {"method", "trainable", "total",
    "heads", ...} (+ "warm_start" or the LoRA settings). ``heads`` always train."""
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
    elif method == "bitfit":
        biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
        if not biases:
            raise ValueError(f"lora.method=bitfit: {type(model).__name__} has no bias parameters to train")
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
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
    if info["trainable"] == 0:
        raise RuntimeError(f"lora.method={method}: no parameter trains")
    log(f"{method}: trainable {info['trainable']:,} of {info['total']:,} parameters "
        f"({100 * info['trainable'] / max(1, info['total']):.3f}%)")
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
