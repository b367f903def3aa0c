"""What trains on a GLUE encoder: LoRA on query/value + head, full fine-tuning, or BitFit.

Trainable parameters (L layers, hidden H, FFN width I, C labels, head P parameters):
    lora   : L * 2 * r (H + H)          (A: r x H, B: H x r for query and for value) + P
    bitfit : every ``*.bias`` (BERT: L (4H + H + I + H + 2H) + H (emb. LayerNorm) + H (pooler)) + P
    full   : every parameter
The head (BERT/RoBERTa/MPNet "classifier", DistilBERT "pre_classifier" + "classifier") always trains,
and with LoRA it is saved with the adapter (``modules_to_save``) so the adapter alone reproduces the model.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

METHODS = ("lora", "full", "bitfit")

# Query/value projection suffixes by config.model_type (the paper adapts W_q and W_v only).
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"], "electra": ["query", "value"], "albert": ["query", "value"],
    "mpnet": ["q", "v"], "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"],
}
HEADS: dict[str, list[str]] = {"distilbert": ["pre_classifier", "classifier"]}
DEFAULT_HEAD = ["classifier"]
DEFAULT_TARGETS = ["query", "value"]  # the config's default; replaced by the architecture's names


def _log(msg: str) -> None:
    print(f"[glue] {msg}", file=sys.stderr, flush=True)


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def head_names(model: nn.Module, requested: list[str] | None = None) -> list[str]:
    """Names of the classification head's module(s): ``requested`` (e.g. lora.modules_to_save) or the
    architecture's; an error naming the model's top-level modules if one does not exist."""
    names = list(requested) if requested else HEADS.get(model_type(model), DEFAULT_HEAD)
    children = dict(model.named_children())
    missing = [n for n in names if n not in children]
    if missing:
        raise ValueError(f"{type(model).__name__} has no head module(s) {missing} (top-level modules: "
                         f"{list(children)}); set lora.modules_to_save to its classification head")
    return names


def lora_targets(model: nn.Module, requested: list[str] | str | None) -> list[str] | str:
    """The requested suffixes, except that the config default ["query", "value"] is translated to the
    architecture's own names (MPNet "q", "v"; DistilBERT "q_lin", "v_lin"), which is logged."""
    if isinstance(requested, str) or (requested is not None and list(requested) != DEFAULT_TARGETS):
        return requested
    kind = model_type(model)
    if kind not in LORA_TARGETS:
        return list(DEFAULT_TARGETS)  # unknown architecture: the injection fails loudly if nothing matches
    targets = LORA_TARGETS[kind]
    if targets != DEFAULT_TARGETS:
        _log(f"lora.target_modules: {kind} names its query/value projections {targets}; using those")
    return targets


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (each tensor once, even if shared)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


def _set_head_trainable(model: nn.Module, heads: list[str]) -> None:
    for name in heads:
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)


def apply_method(model: nn.Module, method: str, lora_section: Any = None, heads: list[str] | None = None,
                 base_model_name: str | None = None, init_from: str | Path | None = None) -> dict[str, Any]:
    """Set what trains (in place) and return {"method", "trainable", "total", "heads", ...}.
    ``lora_section`` is the run config's ``lora`` section (engine.config.LoraSection), used for lora;
    ``init_from`` (lora only) warm-starts from a saved adapter instead of a fresh one (``warm_start``)."""
    if method not in METHODS:
        raise ValueError(f"lora.method must be one of {METHODS}, got {method!r}")
    if init_from and method != "lora":
        raise ValueError(f"lora.init_from needs lora.method=lora (got {method!r})")
    heads = head_names(model, heads)
    info: dict[str, Any] = {"method": method, "heads": heads}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
        _set_head_trainable(model, heads)
    elif init_from:
        info["warm_start"] = warm_start(model, init_from, heads)
    else:
        from loralab.core.inject import inject_adapter
        from loralab.engine.config import LoraSection

        lora_section = lora_section if lora_section is not None else LoraSection()
        targets = lora_targets(model, lora_section.target_modules)
        cfg = lora_section.to_lora_config(task_type="SEQ_CLS", base_model_name_or_path=base_model_name)
        cfg.target_modules = targets
        cfg.modules_to_save = heads
        inject_adapter(model, cfg, adapter_name="default")
        info.update(target_modules=targets, modules_to_save=cfg.modules_to_save, r=cfg.r, alpha=cfg.lora_alpha)
        _check_head_trains(model, cfg.modules_to_save)
    info.update(count_parameters(model))
    _log(f"{method}: trainable {info['trainable']:,} of {info['total']:,} parameters "
         f"({100 * info['trainable'] / max(1, info['total']):.3f}%)")
    return info


def _check_head_trains(model: nn.Module, heads: list[str]) -> None:
    for name in heads:
        params = [p for n, p in model.named_parameters() if n == name or n.startswith(name + ".")]
        if not params or not any(p.requires_grad for p in params):
            raise RuntimeError(f"head {name!r} is frozen after LoRA injection: a classifier head must train")


# ---------------------------------------------------------------- warm start


def warm_start(model: nn.Module, adapter_dir: str | Path, heads: list[str] | None = None) -> dict[str, Any]:
    """Inject the adapter saved in ``adapter_dir`` (e.g. the MNLI one) as "default", trainable, with
    the LoRA weights of the file, and verify that they arrived trainable and equal to the file.

    The saved head is loaded when its shapes fit this model's head. A head saved for another label
    count (MNLI: 3, RTE: 2, STS-B: 1) is replaced by this model's freshly initialised head, which then
    trains and is saved with the adapter like any modules_to_save (logged). The adapter's own settings
    (r, alpha, targets) come from its adapter_config.json."""
    from safetensors.torch import load_file, save_file

    from loralab.core.adapter_io import PREFIX, load_adapter

    src = Path(adapter_dir)
    weights = src / "adapter_model.safetensors"
    if not weights.is_file() or not (src / "adapter_config.json").is_file():
        raise FileNotFoundError(f"lora.init_from={str(src)!r}: expected adapter_config.json and "
                                f"adapter_model.safetensors in {src.resolve()}")
    heads = head_names(model, heads)
    state = load_file(str(weights))
    fresh = {f"{PREFIX}{h}.{n}": p.detach().clone() for h in heads for n, p in getattr(model, h).named_parameters()}
    saved_head = {k: tuple(v.shape) for k, v in state.items() if k in fresh}
    fits = saved_head.keys() == fresh.keys() and all(saved_head[k] == tuple(fresh[k].shape) for k in fresh)
    info: dict[str, Any] = {"init_from": str(src.resolve()), "head_loaded": fits}
    if fits:
        load_adapter(model, src, adapter_name="default", trainable=True)
    else:
        saved_labels = _saved_num_labels({k: state[k] for k in state if "lora_" not in k})
        info["saved_num_labels"] = saved_labels
        _log(f"warm start from {src}: its head {heads} has {saved_labels} outputs "
             f"(shapes {sorted(saved_head.values()) or 'none saved'}), this task needs "
             f"{sorted(tuple(v.shape) for v in fresh.values())}; the head is re-created (fresh init), "
             "the LoRA weights are loaded")
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg["modules_to_save"] = heads
        lora_only = {k: v for k, v in state.items() if "lora_" in k}
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "adapter_config.json").write_text(json.dumps(cfg))
            save_file({**lora_only, **fresh}, str(Path(tmp) / weights.name))
            load_adapter(model, tmp, adapter_name="default", trainable=True)
    _verify_loaded(model, state)
    _check_head_trains(model, heads)
    lora_cfg = model.lora_configs["default"]
    info.update(r=lora_cfg.r, alpha=lora_cfg.lora_alpha, target_modules=lora_cfg.target_modules)
    _log(f"warm start from {src}: LoRA r={lora_cfg.r} alpha={lora_cfg.lora_alpha} on {lora_cfg.target_modules} "
         f"loaded trainable; head {'loaded' if fits else 're-created'}")
    return info


def _saved_num_labels(head_state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the last Linear weight of the saved head (out_proj / classifier): the label count."""
    weights = [k for k in head_state if k.endswith("weight") and head_state[k].ndim == 2]
    if not weights:
        return None
    last = [k for k in weights if "out_proj" in k] or weights
    return int(head_state[sorted(last)[-1]].shape[0])


def _verify_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loud check: every saved LoRA matrix is in the model, equal to the file, and trainable."""
    params = dict(model.named_parameters())
    n = 0
    for key, value in state.items():
        if "lora_" not in key:
            continue
        path = key.removeprefix("base_model.model.")
        stem, kind = path.rsplit(".", 1)  # "...query.lora_A", "weight"
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
