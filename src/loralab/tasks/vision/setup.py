"""The image-classification model and what trains on it: loralab's ResNets by name, pretrained weights
(safetensors, or a .pth read with ``weights_only``), and the methods (LoRA on the convolutions with fc
saved, full fine-tuning, a linear probe of fc alone)."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from loralab.engine.schema import LoraSection
from loralab.engine.typed_config import ConfigError
import loralab.tasks.vision.accounting as accounting

MODEL_NAME = re.compile(r"(resnet18|resnet34|resnet50)(-small)?")
METHODS = ("lora", "full", "linear_probe")
DEFAULT_TARGETS = ["query", "value"]  # LoraSection's default: a transformer's W_q, W_v
HEAD = "fc"

def _log(msg: str) -> None:
    print(f"[vision] {msg}", file=sys.stderr, flush=True)


class VisionConfigError(ConfigError):
    pass


def parse_model_name(name: str) -> tuple[str, bool]:
    """("resnet18", small_stem) from "resnet18" / "resnet18-small"; anything else is refused."""
    m = MODEL_NAME.fullmatch(name.strip().lower())
    if m is None:
        raise VisionConfigError(
            f"model.name={name!r}: the vision experiment builds loralab's own ResNets (resnet18, resnet34, "
            "resnet50; add -small for the 3x3 stride-1 stem without max-pool, for 28-32 px images), not models of "
            "the Hugging Face hub or loralab's zoo. Pretrained weights come from data.pretrained (torchvision names)")
    return m.group(1), m.group(2) is not None


def check_model_config(model_cfg: Any) -> None:
    if model_cfg.quantize != "none":
        raise VisionConfigError(f"model.quantize={model_cfg.quantize}: 4-bit quantization covers linear layers, not "
                                "a ResNet's convolutions; use model.quantize=none")
    if model_cfg.dtype != "float32":
        raise VisionConfigError(f"model.dtype={model_cfg.dtype}: the vision experiment stores weights in float32 "
                                "(BatchNorm statistics need it); use model.compute_dtype=bfloat16 for bfloat16 compute")
    if model_cfg.gradient_checkpointing:
        raise VisionConfigError("model.gradient_checkpointing=true is not implemented for the ResNets; set it false")


def pretrained_channels(path: str | Path) -> int | None:
    from loralab.models.resnet import read_state_dict

    w = read_state_dict(path).get("conv1.weight")
    return int(w.shape[1]) if w is not None and w.dim() == 4 else None


def load_pretrained(model: nn.Module, path: str | Path, num_classes: int) -> dict[str, Any]:
    """Load ``path`` into ``model``; fc is skipped when its class count differs. A stem of another shape
    (ImageNet's 7x7 into a -small model) is an error naming the fix."""
    from loralab.models.resnet import load_resnet_weights, read_state_dict

    sd = read_state_dict(path)
    skip, fc_note = [], "loaded"
    fc = sd.get(f"{HEAD}.weight")
    if fc is not None and fc.shape[0] != num_classes:
        skip.append(HEAD)
        fc_note = f"skipped: the file's fc has {fc.shape[0]} classes, this run {num_classes} (fresh init)"
    stem, own = sd.get("conv1.weight"), model.conv1.weight
    if stem is not None and tuple(stem.shape[2:]) != tuple(own.shape[2:]):
        raise VisionConfigError(
            f"data.pretrained={str(path)!r}: its stem conv1 is {tuple(stem.shape[2:])}, the model's "
            f"{tuple(own.shape[2:])}: use model.name={'resnet18' if stem.shape[-1] == 7 else 'resnet18-small'} (the "
            "same family and stem as the weights; the 7x7 ImageNet stem wants data.image_size >= 64)")
    report = load_resnet_weights(model, path, skip=tuple(skip))
    _log(f"pretrained {path}: {len(report.loaded)} tensors loaded, fc {fc_note}")
    return {"path": str(Path(path).resolve()), "loaded": len(report.loaded), "skipped": report.skipped,
            "fc": fc_note}


def resolve_targets(model: nn.Module, requested: list[str] | str) -> tuple[list[str] | str, str]:
    """(target_modules for the core, description): a ``accounting.TARGET_SETS`` name becomes a regex of the
    exact conv names (exact: a suffix "conv1" would also match every block's conv1)."""
    if isinstance(requested, list) and requested == DEFAULT_TARGETS:
        requested = "all_convs"
    if isinstance(requested, str) and requested in accounting.TARGET_SETS:
        names = accounting.target_modules(model, requested)
        return "|".join(re.escape(n) for n in names), requested
    return requested, "as written"


def check_method(method: str) -> str:
    if method == "bitfit":
        raise VisionConfigError("lora.method=bitfit: a ResNet's convolutions have no bias, so BitFit would train only "
                                "the BatchNorm shifts and fc; use lora.method=linear_probe (fc only), lora or full")
    if method not in METHODS:
        raise VisionConfigError(f"lora.method={method!r}: the vision experiment runs {', '.join(METHODS)}")
    return method


def apply_vision_method(model: nn.Module, lora: LoraSection, base_model_name: str | None = None) -> dict[str, Any]:
    """Set what trains per ``lora.method`` (module docstring); returns the method info."""
    from loralab.core.inject import count_parameters
    from loralab.tasks.common.setup import apply_method

    method = check_method(lora.method)
    heads = list(lora.modules_to_save) if lora.modules_to_save else [HEAD]
    if HEAD not in heads:
        raise VisionConfigError(f"lora.modules_to_save={heads} leaves the classifier {HEAD!r} frozen (a fresh head "
                                f"for new classes must train); add {HEAD!r}")
    if method == "linear_probe":
        if heads != [HEAD]:
            raise VisionConfigError(f"lora.method=linear_probe trains fc alone; lora.modules_to_save={heads} would "
                                    "train more: remove it (or use lora.method=lora / full)")
        model.requires_grad_(False)
        model.get_submodule(HEAD).requires_grad_(True)
        info: dict[str, Any] = {"method": method, "heads": heads}
        info["trainable"], info["total"] = count_parameters(model)
        _log(f"linear_probe: trainable {info['trainable']:,} of {info['total']:,} parameters (fc)")
        return info
    if method == "lora" and not lora.init_from:
        targets, described = resolve_targets(model, lora.target_modules)
        lora = dataclasses.replace(lora, target_modules=targets)
        info = apply_method(model, lora, None, heads, base_model_name)
        info["target_set"] = described
        return info
    return apply_method(model, lora, None, heads, base_model_name)


# ---------------------------------------------------------------- the task


