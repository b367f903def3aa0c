"""The E2E NLG experiment (Hu et al. 2021, Table 3): LoRA on a causal LM, scored by the official metrics.

    build(cfg)  -> (model, TaskSpec, tokenizer)
    report(cfg, model, tokenizer, run_dir, fit_result) -> dict   decode, write hyp.txt / refs.txt, score

Data: ``data.train_file`` (default ``<data_dir>/devset.csv``: the full training set is not shipped
here) and ``data.eval_file`` (default ``testset_w_refs.csv``); see ``e2e_data`` for the encoding and
the completion-only, label-smoothed loss. LoRA targets: the config default ``["query", "value"]``
becomes the architecture's own names: ``q_proj``/``v_proj`` (Llama-style), or for GPT-2 the q and v
slices of the fused ``c_attn`` (``fused_qkv={"c_attn": [True, False, True]}``).

Training evaluation (``TaskSpec.evaluate``) is the completion loss on the evaluation MRs' references,
for monitoring only: no checkpoint is selected on the test set (``metric=None``), as in the paper,
which reports the model after the last epoch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.engine.task import TaskSpec
from loralab.tasks import e2e_presets as _presets  # noqa: F401  (registers e2e-paper, e2e-cpu, ...)
from loralab.tasks.e2e_data import (TRAIN_FILE, completion_loss, data_files, encode_rows,
                                    eos_id, eval_groups, load_rows, make_collate, mean_completion_loss, subsample)
from loralab.tasks.e2e_generate import generate_outputs, results_table, write_official, write_references

RESULT_FILE = "e2e_result.json"
DEFAULT_TARGETS = ["query", "value"]  # the config's default: translated to the architecture's names
LLAMA_LIKE_TARGETS = ["q_proj", "v_proj"]
GPT2_FUSED = {"c_attn": [True, False, True]}


def _log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


def lora_config_for(model: nn.Module, lora_section: Any, base_model_name: str | None = None) -> Any:
    """The core LoraConfig, with the default targets translated to the model's q/v projections."""
    cfg = lora_section.to_lora_config(task_type="CAUSAL_LM", base_model_name_or_path=base_model_name)
    requested = lora_section.target_modules
    if isinstance(requested, list) and requested == DEFAULT_TARGETS and not lora_section.fused_qkv:
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        if model_type == "gpt2":
            cfg.target_modules, cfg.fused_qkv = None, {k: list(v) for k, v in GPT2_FUSED.items()}
        else:
            cfg.target_modules = list(LLAMA_LIKE_TARGETS)
        _log(f"lora targets for {model_type or type(model).__name__}: "
             f"{cfg.fused_qkv or cfg.target_modules} (W_q and W_v, as in the paper)")
    elif lora_section.fused_qkv and isinstance(requested, list) and requested == DEFAULT_TARGETS:
        cfg.target_modules = None  # only the fused projections the user named
    return cfg


def apply_method(model: nn.Module, cfg: Any) -> dict[str, Any]:
    """LoRA (fresh, or warm-started from ``lora.init_from``), full fine-tuning, or BitFit, in place."""
    method = cfg.lora.method
    if method == "lora":
        if cfg.lora.init_from:
            from loralab.core.adapter_io import load_adapter

            load_adapter(model, cfg.lora.init_from, adapter_name="default", trainable=True)
            _log(f"warm start: adapter loaded from {cfg.lora.init_from}")
        else:
            from loralab.core.inject import inject_adapter

            inject_adapter(model, lora_config_for(model, cfg.lora, cfg.model.name), adapter_name="default")
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    else:
        raise ValueError(f"lora.method must be lora, full or bitfit, got {method!r}")
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise RuntimeError(f"lora.method={method}: no parameter trains (a model without biases under bitfit?)")
    _log(f"{method}: trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
    return {"method": method, "trainable": trainable, "total": total}


def load_model_and_tokenizer(cfg: Any) -> tuple[nn.Module, Any]:
    from loralab.models.zoo import load_from_config

    return load_from_config(cfg.model, kind="causal_lm")


def make_task_spec(tokenizer: Any, train_rows: list, eval_rows: list, max_length: int,
                   eval_batch_size: int = 16) -> TaskSpec:
    """Tokenized training rows, right-padding collate, label-smoothed completion loss, eval loss."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    collate = make_collate(pad)
    train = encode_rows(tokenizer, train_rows, max_length)
    held_out = encode_rows(tokenizer, eval_rows, max_length)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return completion_loss(model, batch, label_smoothing=spec.label_smoothing)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"eval_loss": mean_completion_loss(model, held_out, collate, eval_batch_size)} if held_out else {}

    spec = TaskSpec(train_dataset=train, collate=collate, loss=loss, evaluate=evaluate, metric=None,
                    greater_is_better=False)
    return spec


def load_data(cfg: Any, announce: bool = False) -> tuple[list, list[str], list[list[str]], list]:
    """(train rows, eval MRs, their reference groups, the eval rows of those MRs)."""
    train_path, eval_path = data_files(cfg)
    if announce and train_path.name == TRAIN_FILE:
        _log(f"training on {train_path.name} (the official 42k-row trainset.csv is not here; the paper trains "
             "on it: pass data.train_file=PATH to use it)")
    train = subsample(load_rows(train_path), cfg.data.train_samples, cfg.data.seed)
    eval_rows_all = load_rows(eval_path)
    mrs, refs = eval_groups(eval_rows_all, cfg.data.eval_samples)
    keep = set(mrs)
    return train, mrs, refs, [r for r in eval_rows_all if r[0] in keep]


def build(cfg: Any) -> tuple[nn.Module, TaskSpec, Any]:
    """Model with LoRA on W_q, W_v (or full / BitFit), the E2E TaskSpec and the tokenizer."""
    train, mrs, refs, eval_rows = load_data(cfg, announce=True)  # data errors before minutes of model loading
    torch.manual_seed(cfg.train.seed)  # LoRA A init depends on it
    model, tokenizer = load_model_and_tokenizer(cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2: padding is masked out of loss and attention
    model.e2e_info = apply_method(model, cfg)
    spec = make_task_spec(tokenizer, train, eval_rows, cfg.data.max_length, max(16, cfg.train.batch_size))
    _log(f"{len(train)} training rows; evaluation: {len(mrs)} MRs with {sum(map(len, refs))} references")
    return model, spec, tokenizer


def report(cfg: Any, model: nn.Module, tokenizer: Any, run_dir: str | Path | None, fit_result: Any) -> dict:
    """Decode one output per evaluation MR, save hyp.txt / refs.txt / mrs.txt (official formats) and the
    adapter to ``run_dir``, score with the official metrics, print the table beside the paper's row."""
    from loralab.metrics.e2e import score

    _, mrs, refs, _ = load_data(cfg)
    outputs = generate_outputs(model, tokenizer, mrs, cfg.generate)
    result: dict[str, Any] = {
        "experiment": "e2e", "model": cfg.model.name, "method": cfg.lora.method, "seed": cfg.train.seed,
        "eval_mrs": len(mrs), "generate": dict(vars(cfg.generate)),
        "trainable_params": (getattr(model, "e2e_info", None) or {}).get("trainable"),
        "fit": fit_result.to_dict() if hasattr(fit_result, "to_dict") else fit_result,
    }
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_official(run_dir / "hyp.txt", outputs)
        write_references(run_dir / "refs.txt", refs)
        write_official(run_dir / "mrs.txt", mrs)
        result.update(run_dir=str(run_dir), hyp_file=str(run_dir / "hyp.txt"), ref_file=str(run_dir / "refs.txt"))
        if cfg.lora.method == "lora":
            from loralab.core.adapter_io import save_adapter

            save_adapter(model, run_dir / "adapter", adapter_name="default")
            result["adapter_dir"] = str(run_dir / "adapter")
    try:
        scores = score(outputs, refs)
    except RuntimeError as err:  # e.g. no Java: the outputs are saved, say how to score them later
        where = f"; outputs saved: loralab score-e2e {run_dir}/hyp.txt {run_dir}/refs.txt" if run_dir else ""
        raise RuntimeError(f"E2E scoring failed: {err}{where}") from err
    result.update(scores=scores, score=scores["BLEU"], main_metric="BLEU",
                  table=results_table(scores, f"this run: {cfg.model.name} {cfg.lora.method}"))
    if run_dir is not None:
        (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    print(result["table"], flush=True)
    return result
