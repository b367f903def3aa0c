"""The GLUE experiment: LoRA or a baseline method on an encoder with a sequence-classification head.

    build(cfg)               model (method applied), TaskSpec, tokenized dev sets; ``data.task`` picks the task
    baseline(built)          the majority class of the training labels (STS-B: their mean, a constant predictor)
    report(built, fit, dir)  final dev metrics in the common result schema; the adapter saved to <dir>/adapter

Loss: cross-entropy with ``TaskSpec.label_smoothing`` for classification; STS-B is regression with
one output and mean squared error, ``mean((f(x) - y)^2)``, on the raw 0-5 score.
Methods and their trainable parameters:
    lora   : A, B of the query/value projections of every layer (r (d_in + d_out) each) + the head
    full   : every parameter
    bitfit : every bias (attention, FFN, LayerNorm, pooler) + the head
    adapter_h/l/p, prefix_layer, prefix_embed, ft_top2 : ``core.methods`` (counts in ``common.setup``) + the head;
             saved to <dir>/adapter by ``save_method`` and loaded back with ``lora.init_from``
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loralab.engine.experiment import Baseline, Built, Result, margin_for_rate
from loralab.engine.schema import DataConfig
from loralab.engine.task import Batch, TaskSpec
from loralab.metrics.glue import MAIN_METRIC, glue_metrics
from loralab.tasks.common.batches import make_collate
from loralab.tasks.common.results import make_result, save_trained
from loralab.tasks.common.sampling import subsample
from loralab.tasks.common.setup import apply_method, model_type
from loralab.tasks.glue.data import GlueDataError, GlueTask, get_task, load_split, parse_rows, read_tsv, task_files


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
                   max_length: int, eval_batch_size: int = 64) -> tuple[TaskSpec, dict[str, list[dict]]]:
    """The TaskSpec (tokenized train data, dynamic-padding collate, loss and evaluation) of one GLUE task,
    and the tokenized dev sets (kept for the report: no second tokenisation)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = make_collate(pad_id, torch.float32 if task.is_regression else torch.long)
    train_enc = encode_examples(tokenizer, task, train, max_length)
    eval_enc = {s: encode_examples(tokenizer, task, d, max_length) for s, d in eval_sets.items()}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return _loss(_forward(model, batch), batch["labels"], task.is_regression, spec.label_smoothing)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return evaluate_splits(model, task, eval_enc, collate, eval_batch_size)

    spec = TaskSpec(train_dataset=train_enc, collate=collate, loss=loss, evaluate=evaluate,
                    metric=MAIN_METRIC[task.key], greater_is_better=True)
    return spec, eval_enc


# ---------------------------------------------------------------- the experiment


DEFAULT_DATA_DIR = Path(__file__).resolve().parents[4].parent / "shared" / "data" / "glue"
"""``../shared/data/glue`` next to the repository (where this project keeps the GLUE release)."""
HUB = "hub"
"""``data.data_dir=hub``: read the Hub's GLUE dataset (needs `datasets` and internet) instead of TSVs."""
DEFAULT_HEADS: dict[str, list[str]] = {"distilbert": ["pre_classifier", "classifier"]}


@dataclass
class GlueData(DataConfig):
    """GLUE data: the task, and where its release TSVs are."""

    task: str = "sst2"
    """GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte (data_dir=hub: the Hub's GLUE, online only)."""

    def check(self) -> list[tuple[str, str]]:
        return super().check() + ([] if self.task else [("task", "must name a GLUE task")])


def load_task_data(cfg: Any, task: GlueTask) -> tuple[list[dict], dict[str, list[dict]]]:
    """Train examples (seeded subsample of ``data.train_samples``) and every dev set (first
    ``data.eval_samples`` of each). ``data.train_file`` / ``data.eval_file`` replace the train file /
    the first dev file. All needed files are checked before any is read, so one error lists them all."""
    hub = cfg.data.data_dir == HUB
    data_dir = None if hub else Path(cfg.data.data_dir) if cfg.data.data_dir else DEFAULT_DATA_DIR
    if not hub:
        needed = [s for s in task.files if (s == "train" and not cfg.data.train_file)
                  or (s in task.eval_splits and not (cfg.data.eval_file and s == task.eval_splits[0]))]
        task_files(task, data_dir, needed)

    def read(split: str, override: str | None) -> list[dict]:
        if override:
            path = Path(override)
            if not path.is_file():
                raise GlueDataError(f"{task.dir_name} {split} file {str(path.resolve())!r} not found")
            return parse_rows(task, read_tsv(path, task.columns), str(path))
        return load_split(task, split, "hub" if hub else "tsv", data_dir)

    train = subsample(read("train", cfg.data.train_file), cfg.data.train_samples, cfg.data.seed)
    evals = {}
    for n, split in enumerate(task.eval_splits):
        data = read(split, cfg.data.eval_file if n == 0 else None)
        evals[split] = data[:cfg.data.eval_samples] if cfg.data.eval_samples > 0 else data
    return train, evals


def heads_for(model: nn.Module, requested: list[str] | None) -> list[str]:
    """The classification head: ``lora.modules_to_save`` if given, else the architecture's."""
    return list(requested) if requested else DEFAULT_HEADS.get(model_type(model), ["classifier"])


def check_inserted_tokens_fit(model: nn.Module, tokenizer: Any, max_length: int, inserted: int) -> None:
    """prefix_embed makes every input ``inserted`` tokens longer: they must fit the model's positions."""
    limits = [n for n in (getattr(model.config, "max_position_embeddings", None),
                          getattr(tokenizer, "model_max_length", None)) if isinstance(n, int) and 0 < n < 10**6]
    if limits and max_length + inserted > min(limits):
        raise ValueError(f"lora.method=prefix_embed inserts lora.prefix_length + lora.infix_length = {inserted} tokens "
                         f"into every input: data.max_length={max_length} + {inserted} exceeds the model's "
                         f"{min(limits)} positions; set data.max_length <= {min(limits) - inserted}")


class GlueExperiment:
    name: ClassVar[str] = "glue"
    data_config: ClassVar[type] = GlueData
    sections: ClassVar[tuple[str, ...]] = ()

    @property
    def presets(self) -> dict[str, dict]:
        from loralab.tasks.glue.presets import all_presets

        return all_presets()

    @property
    def sweeps(self) -> dict[str, dict]:
        from loralab.tasks.glue.presets import all_sweeps

        return all_sweeps()

    def build(self, cfg: Any) -> Built:
        """Model (method applied; warm-started from ``lora.init_from`` if set), TaskSpec, tokenized dev sets."""
        from loralab.models.zoo import load_from_config

        task = get_task(cfg.data.task)
        train, evals = load_task_data(cfg, task)  # data errors first: before minutes of model loading
        torch.manual_seed(cfg.train.seed)  # the fresh head and the LoRA A matrices depend on the seed
        model, tokenizer = load_from_config(cfg.model, kind="seq_cls", num_labels=task.num_labels)
        if task.is_regression:
            model.config.problem_type = "regression"
        if cfg.lora.method == "full" and cfg.train.lr >= 3e-4:
            _log(f"warning: full fine-tuning with train.lr={cfg.train.lr:g}; encoders usually diverge above "
                 "~1e-4 (glue-cpu-<task>-full uses 5e-5)")
        if cfg.lora.method == "prefix_embed":
            inserted = cfg.lora.prefix_length + cfg.lora.infix_length
            check_inserted_tokens_fit(model, tokenizer, cfg.data.max_length, inserted)
        info = apply_method(model, cfg.lora, "SEQ_CLS", heads_for(model, cfg.lora.modules_to_save), cfg.model.name,
                            tokenizer)
        spec, eval_sets = make_task_spec(task, tokenizer, train, evals, cfg.data.max_length,
                                         eval_batch_size=max(32, cfg.train.batch_size))
        _log(f"{task.dir_name}: {len(train)} train examples, dev sets "
             + ", ".join(f"{s}={len(d)}" for s, d in evals.items()))
        return Built(model, spec, {"cfg": cfg, "task": task, "method": info, "tokenizer": tokenizer,
                                   "train_labels": [ex["label"] for ex in train], "eval_sets": eval_sets})

    def baseline(self, built: Built) -> Baseline:
        """The majority class of the training labels (regression: their mean) predicted for every dev example."""
        task, labels = built.state["task"], built.state["train_labels"]
        constant = sum(labels) / len(labels) if task.is_regression else Counter(labels).most_common(1)[0][0]
        dev = next(iter(built.state["eval_sets"].values()))
        metrics = glue_metrics(task.key, [constant] * len(dev), [ex["labels"] for ex in dev])
        kind = "constant predictor (train mean)" if task.is_regression else f"majority class ({constant})"
        return Baseline(score=metrics[MAIN_METRIC[task.key]], kind=kind, metrics=metrics)

    def report(self, built: Built, fit: Any, run_dir: str | Path | None) -> Result:
        """Final dev metrics of the model as it is now (the kept-best weights after fit)."""
        cfg, task = built.state["cfg"], built.state["task"]
        metrics = evaluate_splits(built.model, task, built.state["eval_sets"], built.task.collate,
                                  max(32, cfg.train.batch_size))
        main = MAIN_METRIC[task.key]
        n = len(next(iter(built.state["eval_sets"].values())))
        base = built.baseline.score if built.baseline else 0.0
        margin = margin_for_rate(base, n) if main == "accuracy" else 2.0 / math.sqrt(max(n, 1))
        info = built.state["method"]
        details = {"task": task.key, "model": cfg.model.name, "method": cfg.lora.method, "seed": cfg.train.seed,
                   "eval_examples": n, "method_info": info, "adapter_dir": save_trained(built.model, run_dir)}
        result = make_result("glue", built, fit, main, metrics, True, margin, details)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"[glue] {task.dir_name} {cfg.lora.method} seed {cfg.train.seed}: {shown} "
              f"(trainable {result.trainable_params:,})", flush=True)
        return result


EXPERIMENT = GlueExperiment()
