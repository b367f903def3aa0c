"""4-bit (QLoRA) loading of a Hugging Face model directory without its full-precision weights.

The model is built from its config with parameters on the meta device (``linear4bit.empty_init``), then
``linear4bit.load_quantized_from_safetensors`` streams the safetensors tensor by tensor: each Linear weight
is quantized on arrival (NF4/FP4/Int4, optional double quant), everything else (embeddings, norms,
skipped heads) is materialized in ``dtype``. Peak memory is the 4-bit model plus one full-precision tensor.

What this module adds around the core loader:

* key layout: a checkpoint saved from the bare encoder (``embeddings.*``, as minilm-l6 is) is streamed
  into ``model.base_model``; one saved from a full model (``model.layers.*``) into the model itself;
* a new classification head (seq_cls: ``classifier``/``score``, absent from the checkpoint) is created
  for real and initialized with the model's own ``_init_weights`` *before* streaming, and kept in full
  precision (it trains); anything else missing is an error from the core loader;
* output heads (``lm_head``, ``score``, ``classifier``) are never quantized (QLoRA keeps them 16/32-bit).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

_NEW_HEAD = re.compile(r"^(classifier|score)(\.|$)")
SKIP_MODULES = ("lm_head", "score", "classifier", "classifier.dense", "classifier.out_proj")
_STATE_SUFFIX = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$")


def checkpoint_keys(model_dir: Path) -> set[str]:
    """Tensor names in the directory's safetensors files (headers only; no tensor is read)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir} (loralab loads safetensors only)")
    keys: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    return {k for k in keys if not _STATE_SUFFIX.search(k)}


def _tensor_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters(remove_duplicate=False)} | {
        n for n, _ in module.named_buffers(remove_duplicate=False)}


def load_4bit(path: Path, auto: Any, kind: str, *, quantize: str, double_quant: bool,
              compute_dtype: torch.dtype, dtype: torch.dtype, trust_remote_code: bool = False,
              block_size: int = 64, **config_kwargs: Any) -> nn.Module:
    """``auto`` (an AutoModelFor* class) built on meta from ``path``'s config and streamed in 4 bits.

    Sets ``model.loralab_load_info = {"source", "new_head", "unexpected_keys", "quantize"}``.
    """
    from transformers import AutoConfig, GenerationConfig

    from loralab.core.quant_io import empty_init, load_quantized_from_safetensors

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, **config_kwargs)
    with empty_init():
        model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    ckpt = checkpoint_keys(path)
    base = model.base_model
    full_names, base_names = _tensor_names(model), _tensor_names(base)
    # Stream into whichever module the checkpoint's names fit (full model vs bare encoder/decoder).
    target = base if base is not model and len(ckpt & base_names) > len(ckpt & full_names) else model
    target_names = base_names if target is base else full_names
    if not ckpt & target_names:
        raise ValueError(f"{path}: no checkpoint tensor name matches {type(model).__name__}; "
                         "is this the right model kind?")
    new_head: list[str] = []
    if kind == "seq_cls":
        for name, module in model.named_children():
            if _NEW_HEAD.match(name) and not any(k.startswith(name + ".") for k in ckpt):
                module.to_empty(device="cpu")
                module.apply(model._init_weights)
                new_head += [f"{name}.{n}" for n, _ in module.named_parameters()]
    skip = SKIP_MODULES if target is model else ()
    load_quantized_from_safetensors(target, path, quant_type=quantize, double_quant=double_quant,
                                    compute_dtype=compute_dtype, skip_modules=skip, strict=False,
                                    block_size=block_size)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _check_loaded(model, target, path)
    if (path / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.loralab_load_info = {"source": str(path), "new_head": sorted(new_head),
                               "unexpected_keys": sorted(ckpt - target_names), "quantize": quantize}
    return model.eval()


def _check_loaded(model: nn.Module, target: nn.Module, path: Path) -> None:
    """Nothing left on meta (e.g. a causal-LM head a bare-encoder checkpoint lacks), and no
    full-precision projection left in the body (e.g. GPT-2's Conv1D, which the core cannot quantize)."""
    from loralab.core.linear4bit import Linear4bit

    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"loading {path} in 4 bits left weights uninitialized (not in the checkpoint): "
                           f"{left[:10]}. Check the model name and kind.")
    plain = [n for n, m in target.named_modules()
             if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not isinstance(m, Linear4bit)
             and not any(n == s or n.startswith(s + ".") for s in SKIP_MODULES)]
    if plain:
        raise NotImplementedError(f"4-bit loading of {path} left {len(plain)} projections unquantized "
                                  f"({plain[:5]}, type {type(target.get_submodule(plain[0])).__name__}); "
                                  "only nn.Linear layers can be stored in 4 bits")
