"""GLUE with LoRA, full fine-tuning or BitFit on an encoder with a sequence-classification head.

    build(cfg)  -> (model, TaskSpec, tokenizer)      cfg.data.task picks the task (see glue_data.TASKS)
    report(cfg, model, tokenizer, run_dir, fit_result) -> dict   final dev metrics, written as JSON

Loss: cross-entropy with ``TaskSpec.label_smoothing`` for classification; STS-B is regression with
one output and mean squared error, ``mean((f(x) - y)^2)``, on the raw 0-5 score.
Methods and their trainable parameters:
    lora   : A, B of the query/value projections of every layer (r (d_in + d_out) each) + the head
    full   : every parameter
    bitfit : every bias (attention, FFN, LayerNorm, pooler) + the head
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralab.engine.task import Batch, TaskSpec
from loralab.metrics.glue import MAIN_METRIC, glue_metrics
from loralab.tasks.glue_data import (GlueDataError, GlueTask, get_task, load_split, parse_rows, read_tsv,
                                     subsample, task_files)
from loralab.tasks.glue_methods import apply_method, count_parameters
from loralab.tasks.glue_report import RESULT_FILE
from loralab.tasks import glue_presets as _presets  # noqa: F401  (registers glue-paper-*, glue-cpu-*)


def _log(msg: str) -> None:
    print(f"[glue] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tokenization and batches

def encode_examples(tokenizer: Any, task: GlueTask, examples: list[dict], max_length: int,
                    chunk: int = 1000) -> list[dict]:
    """Tokenize ``task.text_fields`` of every example: one field -> ``tokenizer(a)``, two ->
    ``tokenizer(a, b)`` (a real pair with the model's separator and segment ids, never a string
    concatenation). Truncation trims the longer segment first, up to ``max_length`` tokens in all."""
    out: list[dict] = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        try:
            segments = [[ex[f] for ex in part] for f in task.text_fields]
        except KeyError as err:
            raise KeyError(f"{task.dir_name} example lacks text field {err}; it needs {task.text_fields}") from None
        enc = tokenizer(*segments, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        for i, ex in enumerate(part):
            out.append({**{k: list(enc[k][i]) for k in keys}, "labels": ex["label"]})
    if task.is_pair and examples:
        _check_pair_encoding(tokenizer, task, examples[0], out[0], max_length)
    return out


def _check_pair_encoding(tokenizer: Any, task: GlueTask, example: dict, encoded: dict, max_length: int) -> None:
    """Loud guard: the pair encoding must be longer than the first segment alone."""
    first_only = tokenizer(example[task.text_fields[0]], truncation=True, max_length=max_length)["input_ids"]
    if len(encoded["input_ids"]) <= len(first_only) and len(first_only) < max_length:
        raise RuntimeError(f"{task.dir_name}: the encoded pair is no longer than its first segment alone; "
                           f"the second field {task.text_fields[1]!r} did not reach the model")


def make_collate(pad_token_id: int, regression: bool):
    """Pads to the longest example of the batch (dynamic padding); labels are float for regression."""
    def collate(examples: list[dict]) -> Batch:
        longest = max(len(ex["input_ids"]) for ex in examples)
        batch: Batch = {}
        for key, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] + [pad] * (longest - len(ex[key])) for ex in examples])
        dtype = torch.float32 if regression else torch.long
        batch["labels"] = torch.tensor([ex["labels"] for ex in examples], dtype=dtype)
        return batch
    return collate


def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool, label_smoothing: float,
          reduction: str = "mean") -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction=reduction)
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction=reduction)


@torch.no_grad()
def predict(model: nn.Module, data: list[dict], collate, regression: bool, batch_size: int = 64,
            label_smoothing: float = 0.0) -> tuple[list, float]:
    """Predictions (class ids, or scores for regression) in ``data`` order, and the mean loss.
    Batches are formed over length-sorted examples (less padding) and scattered back."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
    preds: list = [None] * len(data)
    total_loss = 0.0
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = {k: v.to(device) for k, v in collate([data[i] for i in idx]).items()}
            logits = _forward(model, batch)
            total_loss += float(_loss(logits, batch["labels"], regression, label_smoothing, "sum"))
            values = logits.squeeze(-1).float().tolist() if regression else logits.argmax(-1).tolist()
            for i, v in zip(idx, values):
                preds[i] = v
    finally:
        model.train(was_training)
    return preds, total_loss / max(1, len(data))


def evaluate_splits(model: nn.Module, task: GlueTask, eval_sets: dict[str, list[dict]], collate,
                    batch_size: int = 64) -> dict[str, float]:
    """Metrics of every dev set. The first split's metrics carry plain names (``accuracy``,
    ``eval_loss``; they select checkpoints); MNLI's mismatched set adds ``accuracy_mm``, ``eval_loss_mm``
    and the matched set is repeated as ``accuracy_m``."""
    out: dict[str, float] = {}
    for n, (split, data) in enumerate(eval_sets.items()):
        preds, loss = predict(model, data, collate, task.is_regression, batch_size)
        metrics = {**glue_metrics(task.key, preds, [ex["labels"] for ex in data]), "eval_loss": loss}
        suffix = {"dev_matched": "_m", "dev_mismatched": "_mm"}.get(split, "")
        for key, value in metrics.items():
            if n == 0:
                out[key] = value
            if suffix:
                out[key + suffix] = value
    return out


def make_task_spec(task: GlueTask, tokenizer: Any, train: list[dict], eval_sets: dict[str, list[dict]],
                   max_length: int, eval_batch_size: int = 64) -> TaskSpec:
    """Tokenized train/dev data, dynamic-padding collate, loss and evaluation for one GLUE task."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = make_collate(pad_id, task.is_regression)
    train_enc = encode_examples(tokenizer, task, train, max_length)
    eval_enc = {s: encode_examples(tokenizer, task, d, max_length) for s, d in eval_sets.items()}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return _loss(_forward(model, batch), batch["labels"], task.is_regression, spec.label_smoothing)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return evaluate_splits(model, task, eval_enc, collate, eval_batch_size)

    spec = TaskSpec(train_dataset=train_enc, collate=collate, loss=loss, evaluate=evaluate,
                    metric=MAIN_METRIC[task.key], greater_is_better=True)
    return spec


# ---------------------------------------------------------------- build / report (the engine's contract)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "glue"
"""``../shared/data/glue`` next to the repository (where this project keeps the GLUE release)."""
HUB = "hub"
"""``data.data_dir=hub``: read the Hub's GLUE dataset (needs `datasets` and internet) instead of TSVs."""


def _data_source(cfg: Any) -> tuple[str, Path | None]:
    data_dir = cfg.data.data_dir
    if data_dir == HUB:
        return "hub", None
    return "tsv", Path(data_dir) if data_dir else DEFAULT_DATA_DIR


def load_task_data(cfg: Any, task: GlueTask, with_train: bool = True) -> tuple[list[dict], dict[str, list[dict]]]:
    """Train examples (seeded subsample of ``data.train_samples``) and every dev set (first
    ``data.eval_samples`` of each). ``data.train_file`` / ``data.eval_file`` replace the train file /
    the first dev file. All needed files are checked before any is read, so one error lists them all."""
    source, data_dir = _data_source(cfg)
    if source == "tsv":
        needed = [s for s in task.files if (s == "train" and with_train and not cfg.data.train_file)
                  or (s in task.eval_splits and not (cfg.data.eval_file and s == task.eval_splits[0]))]
        task_files(task, data_dir, needed)

    def read(split: str, override: str | None) -> list[dict]:
        if override:
            path = Path(override)
            if not path.is_file():
                raise GlueDataError(f"{task.dir_name} {split} file {str(path.resolve())!r} not found")
            return parse_rows(task, read_tsv(path, task.columns), str(path))
        return load_split(task, split, source, data_dir)

    train = read("train", cfg.data.train_file) if with_train else []
    train = subsample(train, cfg.data.train_samples, cfg.data.seed)
    evals = {}
    for n, split in enumerate(task.eval_splits):
        data = read(split, cfg.data.eval_file if n == 0 else None)
        evals[split] = data[:cfg.data.eval_samples] if cfg.data.eval_samples > 0 else data
    return train, evals


def load_model_and_tokenizer(cfg: Any, num_labels: int) -> tuple[nn.Module, Any]:
    """The encoder with a fresh ``num_labels``-way head (1: regression) and its tokenizer."""
    from loralab.models.zoo import load_from_config

    model, tokenizer = load_from_config(cfg.model, kind="seq_cls", num_labels=num_labels)
    if num_labels == 1:
        model.config.problem_type = "regression"
    return model, tokenizer


def build(cfg: Any) -> tuple[nn.Module, TaskSpec, Any]:
    """Model (method applied: LoRA / full / BitFit; warm-started from ``lora.init_from`` if set),
    the TaskSpec of ``data.task`` and the tokenizer."""
    task = get_task(cfg.data.task)
    if cfg.model.num_labels not in (None, task.num_labels):
        raise ValueError(f"model.num_labels={cfg.model.num_labels} but {task.dir_name} has {task.num_labels} "
                         "label(s); leave model.num_labels unset for GLUE")
    train, evals = load_task_data(cfg, task)  # data errors first: before minutes of model loading
    torch.manual_seed(cfg.train.seed)  # the fresh head and the LoRA A matrices depend on the seed
    model, tokenizer = load_model_and_tokenizer(cfg, task.num_labels)
    method = cfg.lora.method
    if method == "full" and cfg.train.lr >= 3e-4:
        _log(f"warning: full fine-tuning with train.lr={cfg.train.lr:g}; encoders usually diverge above "
             "~1e-4 (glue-cpu-<task>-full uses 5e-5)")
    info = apply_method(model, method, cfg.lora, heads=cfg.lora.modules_to_save, base_model_name=cfg.model.name,
                        init_from=cfg.lora.init_from)
    model.glue_info = info
    spec = make_task_spec(task, tokenizer, train, evals, cfg.data.max_length,
                          eval_batch_size=max(32, cfg.train.batch_size))
    _log(f"{task.dir_name}: {len(train)} train examples, dev sets "
         + ", ".join(f"{s}={len(d)}" for s, d in evals.items()))
    return model, spec, tokenizer


def report(cfg: Any, model: nn.Module, tokenizer: Any, run_dir: str | Path | None, fit_result: Any) -> dict:
    """Final dev metrics of ``model`` as it is now (the kept-best weights after fit), the trainable
    count, the fit summary; written to ``<run_dir>/glue_result.json``; the LoRA adapter is saved to
    ``<run_dir>/adapter`` (usable as another task's ``lora.init_from``)."""
    task = get_task(cfg.data.task)
    _, evals = load_task_data(cfg, task, with_train=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = {s: encode_examples(tokenizer, task, d, cfg.data.max_length) for s, d in evals.items()}
    metrics = evaluate_splits(model, task, enc, make_collate(pad_id, task.is_regression),
                              max(32, cfg.train.batch_size))
    info = dict(getattr(model, "glue_info", {}) or {})
    counts = count_parameters(model)
    main = MAIN_METRIC[task.key]
    result = {
        "experiment": "glue", "task": task.key, "model": cfg.model.name, "method": cfg.lora.method,
        "seed": cfg.train.seed, "main_metric": main, "score": metrics[main], "metrics": metrics,
        "trainable_params": info.get("trainable", counts["trainable"]), "total_params": counts["total"],
        "train_examples": cfg.data.train_samples or None, "max_length": cfg.data.max_length,
        "warm_start": info.get("warm_start"),
        "settings": {"lr": cfg.train.lr, "epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps,
                     "batch_size": cfg.train.batch_size, "r": cfg.lora.r if cfg.lora.method == "lora" else None,
                     "alpha": cfg.lora.alpha if cfg.lora.method == "lora" else None,
                     "train_samples": cfg.data.train_samples, "max_length": cfg.data.max_length,
                     "init_from": cfg.lora.init_from},
        "fit": fit_result.to_dict() if hasattr(fit_result, "to_dict") else fit_result,
    }
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        result["run_dir"] = str(run_dir)
        if cfg.lora.method == "lora":
            from loralab.core.adapter_io import save_adapter

            save_adapter(model, run_dir / "adapter", adapter_name="default")
            result["adapter_dir"] = str(run_dir / "adapter")
        (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    print(f"[glue] {task.dir_name} {cfg.lora.method} seed {cfg.train.seed}: {shown} "
          f"(trainable {result['trainable_params']:,})", flush=True)
    return result
