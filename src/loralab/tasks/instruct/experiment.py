"""The instruction-tuning experiment (``experiment: instruct``): LoRA/QLoRA on a chat model.

    build(cfg)               the causal LM (4-bit when model.quantize is set) with the method applied,
                             the TaskSpec (assistant-token loss), the held-out examples
    baseline(built)          the un-adapted model's held-out assistant-token loss (lower is better)
    report(built, fit, dir)  resources, the adapter guard, held-out loss base -> fine-tuned, GSM8K exact
                             match, side-by-side generations; one printed summary block

Dataset formats, GSM8K and the assistant-only tokenization: :mod:`loralab.tasks.instruct.data`;
evaluation: :mod:`loralab.tasks.instruct.eval`; presets (``qlora``, ``instruct-cpu``, ``quickstart``...):
:mod:`loralab.tasks.instruct.presets`; the end-of-run summary: :mod:`loralab.tasks.instruct.summary`.
``report`` measures the process's peak memory first (what loading + training cost), then runs the
adapter-present guard, and only then scores anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from loralab.engine.experiment import Baseline, Built, Result
from loralab.engine.schema import DataConfig
from loralab.engine.task import TaskSpec
from loralab.tasks.common.batches import make_collate
from loralab.tasks.common.causal_lm import mean_token_loss
from loralab.tasks.common.results import make_result
from loralab.tasks.common.sampling import subsample
from loralab.tasks.common.setup import apply_method
from loralab.tasks.instruct.data import (FORMATS, IGNORE, Conversation, gsm8k_records, gsm8k_split, pack_examples,
                                         read_records, to_conversations, tokenize_all)

GENERIC_HELDOUT_PER_MILLE = 50
LOSS_MARGIN = 0.01
"""A fine-tuned held-out loss must be at least 1% below the un-adapted model's to count as learned."""


def _log(msg: str) -> None:
    print(f"[instruct] {msg}", flush=True)


@dataclass
class InstructData(DataConfig):
    """Instruction data: GSM8K (shipped) or a file/Hub dataset in a known format."""

    task: str = "gsm8k"
    """"gsm8k" (the shipped problems, hash split) or a format ("auto", "alpaca", ..., "oasst" = every leaf
    path, "oasst_best" = best-ranked paths) read from data.train_file (a local file or a Hub id)."""
    system_prompt: str | None = None
    """System prompt for chat-formatted examples (None: none)."""
    packing: bool = False
    """Concatenate short examples into full max_length rows (attention kept within each example)."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """Tokens that carry the loss: the assistant response only, or every token."""

    def check(self) -> list[tuple[str, str]]:
        return super().check() + ([] if self.task else [("task", "must name a task")])


def _data_path(cfg: Any, name: str | None) -> str | None:
    if name is None or cfg.data.data_dir is None or Path(name).is_absolute():
        return name
    candidate = Path(cfg.data.data_dir) / name
    return str(candidate) if candidate.exists() else name


def load_split_records(cfg: Any) -> tuple[list[dict], list[dict], str, str]:
    """(train records, held-out records, format, oasst mode), subsampled per data.train/eval_samples."""
    task = cfg.data.task
    if task == "gsm8k":  # the shipped problems, hash-split; data.eval_file replaces the held-out split
        path, held_path = _data_path(cfg, cfg.data.train_file), _data_path(cfg, cfg.data.eval_file)
        train, fmt, mode = gsm8k_records("train", path), "question_answer", "leaves"
        held = read_records(held_path) if held_path else gsm8k_records("heldout", path)
    else:
        fmt, mode = ("oasst", "best") if task == "oasst_best" else (task, "leaves")
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"data.task={task!r}: expected 'gsm8k', 'auto', 'oasst_best' or a format {FORMATS}")
        if not cfg.data.train_file:
            raise ValueError(f"data.task={task!r} reads data.train_file (a .json/.jsonl/.csv file or a Hub id); set it")
        records = read_records(_data_path(cfg, cfg.data.train_file))
        if cfg.data.eval_file:
            train, held = records, read_records(_data_path(cfg, cfg.data.eval_file))
        elif fmt == "oasst":  # split whole trees (by root id), never messages of one tree
            raise ValueError("OASST trees need an explicit data.eval_file (e.g. the validation split)")
        else:
            key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
            held = [r for r in records if gsm8k_split(key(r), GENERIC_HELDOUT_PER_MILLE) == "heldout"]
            train = [r for r in records if gsm8k_split(key(r), GENERIC_HELDOUT_PER_MILLE) == "train"]
    if fmt != "oasst":
        train = subsample(train, cfg.data.train_samples, cfg.data.seed)
        held = held[: cfg.data.eval_samples] if cfg.data.eval_samples else held
    return train, held, fmt, mode


def examples_for(cfg: Any, tokenizer: Any, convs: list[Conversation], pack: bool,
                 stats: dict | None = None) -> list[dict]:
    """Tokenized examples cut to data.max_length; ``stats`` (if given) receives how many were cut.

    A cut GSM8K answer loses its final "#### N" line, so the fraction cut is worth knowing."""
    full = tokenize_all(tokenizer, convs, max_length=None, train_on=cfg.data.loss_on)
    limit = cfg.data.max_length
    cut = sum(len(ex["input_ids"]) > limit for ex in full)
    examples = [ex for ex in ({"input_ids": ex["input_ids"][:limit], "labels": ex["labels"][:limit]} for ex in full)
                if any(lab != IGNORE for lab in ex["labels"][1:])]
    if stats is not None:
        stats.update({"conversations": len(convs), "truncated": cut, "truncated_fraction": cut / max(1, len(full)),
                      "max_length": limit})
    if len(examples) < len(convs):
        _log(f"dropped {len(convs) - len(examples)} of {len(convs)} conversations with no trained token "
             f"left after truncation to {limit}")
    return pack_examples(examples, limit) if pack else examples


def make_task(train: list[dict], pad_id: int) -> TaskSpec:
    spec: TaskSpec

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return mean_token_loss(model, batch, spec.label_smoothing)

    spec = TaskSpec(train_dataset=train, collate=make_collate(pad_id), loss=loss, metric=None,
                    greater_is_better=False, tokens=lambda batch: int(batch["attention_mask"].sum()))
    return spec


class InstructExperiment:
    name: ClassVar[str] = "instruct"
    data_config: ClassVar[type] = InstructData
    sections: ClassVar[tuple[str, ...]] = ("generate",)
    shared_baseline: ClassVar[bool] = True
    """The baseline is the un-adapted model on the evaluation set: runs of one sweep that differ only in
    method or recipe measure it once (``engine.runner.measure_baseline``)."""

    @property
    def presets(self) -> dict[str, dict]:
        from loralab.tasks.instruct.presets import all_presets

        return all_presets()

    def build(self, cfg: Any) -> Built:
        from loralab.models.zoo import load_from_config
        from loralab.tasks.instruct.eval import scored_heldout_loss

        if cfg.lora.method in ("prefix_layer", "prefix_embed"):
            raise ValueError(f"lora.method={cfg.lora.method}: not available for instruct: its baseline and adapter "
                             "check assume the fresh model is the base model, which random prefixes are not"
                             + ("; and prefix embeddings cannot decode incrementally" if
                                cfg.lora.method == "prefix_embed" else ""))
        train_recs, held_recs, fmt, mode = load_split_records(cfg)  # data errors before the model loads
        system = cfg.data.system_prompt
        train_c, held_c = (to_conversations(r, fmt, system, mode) for r in (train_recs, held_recs))
        torch.manual_seed(cfg.train.seed)  # LoRA A init
        model, tokenizer = load_from_config(cfg.model, kind="causal_lm")
        info = apply_method(model, cfg.lora, "CAUSAL_LM", list(cfg.lora.modules_to_save or []), cfg.model.name,
                            tokenizer)
        stats: dict[str, Any] = {}
        train = examples_for(cfg, tokenizer, train_c, cfg.data.packing, stats)
        held = examples_for(cfg, tokenizer, held_c, False)
        if not train:
            raise ValueError(f"no training examples for data.task={cfg.data.task!r}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        _log(f"{cfg.data.task}: {len(train)} train rows{' (packed)' if cfg.data.packing else ''}, "
             f"{len(held)} held-out examples, loss on {cfg.data.loss_on} tokens, max_length {cfg.data.max_length} "
             f"({stats['truncated']} of {stats['conversations']} training conversations cut, "
             f"{100 * stats['truncated_fraction']:.1f}%)")
        task = make_task(train, pad_id)
        eval_batch = max(8, cfg.train.batch_size)
        if held and (cfg.train.max_steps == 0 or cfg.train.eval_every > 0):  # mid-run selection asked for
            task.evaluate = lambda m: scored_heldout_loss(m, held, task.collate, eval_batch)
            task.metric = "eval_loss"
        return Built(model, task, {"cfg": cfg, "tokenizer": tokenizer, "held": held, "held_records": held_recs,
                                   "method": info, "data_stats": stats, "eval_batch": eval_batch})

    def baseline(self, built: Built) -> Baseline:
        """The un-adapted model's held-out loss (adapters off; before training the model is untouched)."""
        from loralab.core.inject import disable_adapters
        from loralab.tasks.instruct.eval import scored_heldout_loss

        model = built.model
        off = disable_adapters(model)  # a model without adapters is itself
        with off:
            loss = scored_heldout_loss(model, built.state["held"], built.task.collate, built.state["eval_batch"],
                                       not built.state["cfg"].train.quiet and "held-out loss (base)")
        return Baseline(score=loss["eval_loss"], kind="un-adapted model", metrics=loss)

    def report(self, built: Built, fit: Any, run_dir: str | Path | None) -> Result:
        from loralab.tasks.instruct.evaluate import evaluate_run

        details = evaluate_run(built, fit, run_dir)
        metrics = {"eval_loss": details["heldout"]["finetuned_loss"], "eval_ppl": details["heldout"]["finetuned_ppl"]}
        if "gsm8k" in details:
            tuned = details["gsm8k"]["finetuned"]
            metrics.update({"gsm8k_exact_match": tuned["exact_match"], "gsm8k_answer_format": tuned["answer_format"],
                            "gsm8k_looping": tuned["looping"]})
            if "base" in details["gsm8k"]:
                base_g = details["gsm8k"]["base"]
                metrics.update({"base_gsm8k_exact_match": base_g["exact_match"],
                                "base_gsm8k_answer_format": base_g["answer_format"],
                                "base_gsm8k_looping": base_g["looping"]})
        base = built.baseline.score if built.baseline else 0.0
        return make_result("instruct", built, fit, "eval_loss", metrics, False, LOSS_MARGIN * base, details)


EXPERIMENT = InstructExperiment()
