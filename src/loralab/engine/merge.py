"""Folding a trained adapter into its base: a plain Hugging Face model dir, checked before and after saving.

The experiment builds the model with the adapter warm-started (``lora.init_from``) on the
full-precision base. LoRA: ``unload(merge=True)`` folds ``W <- W + s B A`` and keeps the trained
modules_to_save (the head). ``ft_top2`` / ``bitfit`` dirs hold trained weights of the model itself:
loading them *is* the merge. Bottleneck adapters and prefixes cannot be folded into any weight; they
are refused, with the core's reason, before anything is built. The merged model's logits, and those of
the saved dir reloaded, must equal the adapter model's within 1e-3 of the largest logit.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from loralab.engine.config import RunConfig
from loralab.engine.experiment import get_experiment


class MergeError(RuntimeError):
    pass


def merge_adapter(cfg: RunConfig, adapter: str | Path, out: str | Path) -> dict[str, Any]:
    """Merge ``adapter`` into ``cfg.model`` and save it to ``out`` (which must be new or empty)."""
    import torch

    from loralab.core.inject import lora_modules, unload
    from loralab.core.methods import merge_refusal, saved_method

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory")
    method = saved_method(adapter)
    refusal = merge_refusal(method)
    if refusal:
        raise MergeError(f"{adapter} holds a {method!r} run, which cannot be merged: {refusal}")
    if cfg.model.quantize != "none":  # merging into 4-bit weights would re-quantize the sum
        print(f"note: merging into the full-precision base, not the {cfg.model.quantize} one it trained on",
              file=sys.stderr)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize="none"),
                              lora=dataclasses.replace(cfg.lora, method=method, init_from=str(adapter)))
    built = get_experiment(cfg.experiment).build(cfg)
    model, task = built.model, built.task
    if method == "lora" and not any(True for _ in lora_modules(model)):
        raise MergeError(f"no LoRA layers in the model built with {adapter}: nothing to merge")
    model.eval()
    batch = {k: v for k, v in task.collate([task.train_dataset[0]]).items() if k in ("input_ids", "attention_mask")}

    def check(logits: torch.Tensor, what: str) -> float:
        diff = (before - logits.float()).abs().max().item()
        tolerance = 1e-3 * max(1.0, before.abs().max().item())
        if not diff <= tolerance:
            raise MergeError(f"{what} differs from the adapter model by {diff:.3g} (> {tolerance:.3g})")
        return diff

    with torch.no_grad():
        before = model(**batch).logits.float()
        if method == "lora":
            model = unload(model, merge=True)  # merge=True also keeps the trained modules_to_save (the head)
        merged_diff = check(model(**batch).logits, "the merged model (not saved)")
        model.save_pretrained(out)
        reloaded = type(model).from_pretrained(out).eval()  # what a user of the exported dir will get
        reload_diff = check(reloaded(**batch).logits, f"the model saved in {out}, reloaded,")
    tokenizer = built.state.get("tokenizer")
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    info = {"adapter": str(adapter), "method": method, "base": cfg.model.name, "max_abs_logit_diff_merged": merged_diff,
            "max_abs_logit_diff_reloaded": reload_diff}
    (out / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
