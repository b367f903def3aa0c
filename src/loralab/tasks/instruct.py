"""The instruction-tuning experiment: ``build(cfg)`` and ``report(...)`` for ``experiment: instruct``.

The pieces live in smaller modules and are re-exported here: dataset formats, GSM8K and the
assistant-only tokenization in :mod:`loralab.tasks.instruct_data`, batches and the loss in
:mod:`loralab.tasks.instruct_task`, evaluation (adapter guard, held-out loss, exact match,
generations) in :mod:`loralab.tasks.instruct_eval`, presets (``qlora``, ``instruct-cpu``,
``instruct-cpu-nf4``, ``quickstart``) in :mod:`loralab.tasks.instruct_presets`, and the readable
end-of-run summary in :mod:`loralab.tasks.quickstart`.

``report`` order matters: it measures the process's peak memory first (what loading + training
cost), then runs the adapter-present guard, and only then scores anything.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.engine.task import TaskSpec
from loralab.tasks.instruct_data import (END_OF_TURN_TOKENS, FORMATS, GSM8K_PATH_PARTS, IGNORE,  # noqa: F401
                                         LLAMA3_CHAT_TEMPLATE, Conversation, TrainOn, detect_format,
                                         end_of_turn_ids, from_alpaca, from_hh_rlhf, from_longform,
                                         from_messages, from_oasst, from_oig_chip2, from_prompt_completion,
                                         from_question_answer, gsm8k_path, gsm8k_records, gsm8k_split,
                                         pack_examples, read_records, render_ids, resolve_chat_template,
                                         to_conversations, tokenize_all, tokenize_conversation)
from loralab.tasks.instruct_presets import register_presets
from loralab.tasks.instruct_task import (block_causal_mask, forward_logits, heldout_loss,  # noqa: F401
                                         make_collate, make_task, token_loss_sum)

# data.task: "gsm8k" (the shipped problems, hash split) or a format name ("auto", "alpaca", ...,
# "oasst" = every leaf path, "oasst_best" = best-ranked path, the Guanaco recipe) read from
# data.train_file (a local file or a Hub id); the held-out set is data.eval_file, else the
# records whose sha256 bucket is < 50 per mille (5%), chosen exactly as for GSM8K.

RESULT_FILE = "instruct_result.json"
STUDY_MAX_NEW_TOKENS = 48
GENERIC_HELDOUT_PER_MILLE = 50


def _log(msg: str) -> None:
    print(f"[instruct] {msg}", flush=True)


def _data_path(cfg: Any, name: str | None) -> str | None:
    if name is None or cfg.data.data_dir is None or Path(name).is_absolute():
        return name
    candidate = Path(cfg.data.data_dir) / name
    return str(candidate) if candidate.exists() else name


def load_split_records(cfg: Any) -> tuple[list[dict], list[dict], str, str]:
    """(train records, held-out records, format, oasst mode), subsampled per data.train/eval_samples."""
    task = cfg.data.task
    if task == "gsm8k":
        path = _data_path(cfg, cfg.data.train_file)
        train, held, fmt, mode = gsm8k_records("train", path), gsm8k_records("heldout", path), "question_answer", "leaves"
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
    if cfg.data.train_samples and fmt != "oasst":
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.data.seed)).tolist()
        train = [train[i] for i in order[: cfg.data.train_samples]]
    if cfg.data.eval_samples and fmt != "oasst":
        held = held[: cfg.data.eval_samples]
    return train, held, fmt, mode


def load_model_and_tokenizer(cfg: Any) -> tuple[nn.Module, Any]:
    from loralab.models.zoo import load_from_config

    model, tokenizer = load_from_config(cfg.model, kind="causal_lm")
    if cfg.model.gradient_checkpointing:
        # non-reentrant: gradients reach the LoRA weights although the embeddings' output needs no grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


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


def apply_lora(model: nn.Module, cfg: Any) -> None:
    method = cfg.lora.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "bitfit":
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        if not biases:
            raise ValueError(f"lora.method=bitfit: {cfg.model.name} has no bias parameters to train")
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("bias"))
    elif cfg.lora.init_from:
        from loralab.core.adapter_io import load_adapter

        load_adapter(model, cfg.lora.init_from, adapter_name="default", trainable=True)
    else:
        from loralab.core.inject import inject_adapter

        inject_adapter(model, cfg.lora.to_lora_config(task_type="CAUSAL_LM",
                                                      base_model_name_or_path=cfg.model.name))
    from loralab.core.inject import trainable_report

    _log(f"{method}: {trainable_report(model)}")


def build(cfg: Any) -> tuple[nn.Module, TaskSpec, Any]:
    """The causal LM (4-bit when model.quantize is set) with LoRA, the TaskSpec, the tokenizer."""
    train_recs, held_recs, fmt, mode = load_split_records(cfg)  # data errors before the model loads
    system = cfg.data.system_prompt
    train_c = to_conversations(train_recs, fmt, system, mode)
    held_c = to_conversations(held_recs, fmt, system, mode)
    torch.manual_seed(cfg.train.seed)  # LoRA A init
    model, tokenizer = load_model_and_tokenizer(cfg)
    apply_lora(model, cfg)
    stats: dict[str, Any] = {}
    train = examples_for(cfg, tokenizer, train_c, cfg.data.packing, stats)
    held = examples_for(cfg, tokenizer, held_c, False)
    model.loralab_data_stats = stats  # read back by report()
    if not train:
        raise ValueError(f"no training examples for data.task={cfg.data.task!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _log(f"{cfg.data.task}: {len(train)} train rows{' (packed)' if cfg.data.packing else ''}, "
         f"{len(held)} held-out examples, loss on {cfg.data.loss_on} tokens, max_length {cfg.data.max_length} "
         f"({stats['truncated']} of {stats['conversations']} training conversations cut, "
         f"{100 * stats['truncated_fraction']:.1f}%)")
    task = make_task(train, held, pad_id, eval_batch_size=max(8, cfg.train.batch_size))
    if cfg.train.max_steps > 0 and cfg.train.eval_every == 0:
        task.evaluate, task.metric = None, None  # no mid-run selection asked for: report() scores once
    return model, task, tokenizer


def report(cfg: Any, model: nn.Module, tokenizer: Any, run_dir: str | Path | None, fit_result: Any) -> dict:
    """Resources, guard, then held-out loss/ppl (base vs fine-tuned), GSM8K exact match, side-by-side
    generations (and LLM-judge scores when LORALAB_JUDGE_* is set); written to the run dir and
    summarized in one printed block (``result["summary"]``)."""
    from loralab.core.inject import trainable_report
    from loralab.core.memory import memory_report
    from loralab.tasks import instruct_eval as ev
    from loralab.tasks import quickstart as qs

    resources = qs.measure_resources(fit_result)  # before evaluation: the peak of load + train
    _, held_recs, fmt, mode = load_split_records(cfg)
    held = examples_for(cfg, tokenizer, to_conversations(held_recs, fmt, cfg.data.system_prompt, mode), False)
    collate = make_collate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    base_only = cfg.lora.method == "lora" and fit_result is None and not cfg.lora.init_from
    result: dict[str, Any] = {"experiment": "instruct", "task": cfg.data.task, "model": cfg.model.name,
                              "quantize": cfg.model.quantize, "method": cfg.lora.method, "base_only": base_only,
                              "fit": fit_result.to_dict() if hasattr(fit_result, "to_dict") else fit_result}
    gen_kw = {"max_new_tokens": cfg.generate.max_new_tokens, "batch_size": cfg.generate.batch_size,
              "system_prompt": cfg.data.system_prompt}
    # the study's short prompts need no long answers; a cap keeps them from dominating eval time
    study_kw = {**gen_kw, "max_new_tokens": min(STUDY_MAX_NEW_TOKENS, cfg.generate.max_new_tokens)}
    show = not cfg.train.quiet  # progress bars for every scoring pass (stderr)
    study_kw["progress"] = show
    adapter = cfg.lora.method == "lora" and not base_only
    if adapter:  # the guard runs before any scoring: a zero or detached adapter is an error, not a result
        result["adapter_check"] = ev.assert_adapter_present(model, collate(held[:4]))
        result["heldout"] = ev.compare_heldout_loss(model, held, collate, max(8, cfg.train.batch_size), show)
        result["generations"] = ev.side_by_side(model, tokenizer, ev.STUDY_PROMPTS, **study_kw)
    else:
        from loralab.core.inject import disable_adapters, lora_modules

        scope = disable_adapters(model) if list(lora_modules(model)) else contextlib.nullcontext()
        with scope:  # base_only: the zero adapter is off; full / bitfit: the model itself
            result["heldout"] = heldout_loss(model, held, collate, max(8, cfg.train.batch_size))
            result["generations"] = [{"prompt": p, "output": o} for p, o in
                                     zip(ev.STUDY_PROMPTS, ev.generate(model, tokenizer, ev.STUDY_PROMPTS, **study_kw))]
    if cfg.data.task == "gsm8k":
        problems = held_recs
        label = "GSM8K (fine-tuned)" if adapter else "GSM8K"
        result["gsm8k"] = {"finetuned": ev.gsm8k_exact_match(model, tokenizer, problems, **gen_kw,
                                                             progress=show and label)}
        if adapter:
            from loralab.core.inject import disable_adapters

            with disable_adapters(model):
                result["gsm8k"]["base"] = ev.gsm8k_exact_match(model, tokenizer, problems, **gen_kw,
                                                               progress=show and "GSM8K (base)")
    result["judge"] = _judge(result["generations"])
    resources["eval_seconds"] = time.time() - resources.pop("measured_at")
    result["train_data"] = getattr(model, "loralab_data_stats", None)
    result["resources"] = resources
    memory = memory_report(model)
    result["memory"] = memory.as_dict()
    if run_dir is not None:
        _write(result, model, cfg, Path(run_dir), base_only)
    result["summary"] = qs.format_summary(cfg, result, str(memory), trainable_report(model),
                                          qs.train_loss_curve(run_dir))
    if run_dir is not None:
        (Path(run_dir) / "summary.txt").write_text(result["summary"] + "\n")
        row = {"variant": f"{cfg.lora.method} ({cfg.model.quantize}, gradient checkpointing "
                          f"{'on' if cfg.model.gradient_checkpointing else 'off'})", **resources,
               "memory_by_role_mb": {k: v / 2**20 for k, v in result["memory"]["by_role"].items()}}
        (Path(run_dir) / "resources.json").write_text(json.dumps(row, indent=2) + "\n")
    print(result["summary"], flush=True)
    return result


def _judge(rows: list[dict]) -> dict:
    import os

    from loralab.tasks.judge import JudgeError, judge_scores

    if not os.environ.get("LORALAB_JUDGE_URL"):
        return {"skipped": "LORALAB_JUDGE_URL not set"}
    try:
        return {"scores": [{"prompt": r["prompt"], **dict(zip(("base", "finetuned"),
                                                              judge_scores(r["prompt"], [r["base"], r["finetuned"]])))}
                           if "base" in r else {"prompt": r["prompt"], "output": judge_scores(r["prompt"], [r["output"]])[0]}
                           for r in rows]}
    except JudgeError as e:  # the judge is optional: its failure must not lose the trained run
        return {"error": str(e)}


def _write(result: dict, model: nn.Module, cfg: Any, run_dir: Path, base_only: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    result["run_dir"] = str(run_dir)
    if cfg.lora.method == "lora" and not base_only:
        from loralab.core.adapter_io import save_adapter

        save_adapter(model, run_dir / "adapter", adapter_name="default")
        result["adapter_dir"] = str(run_dir / "adapter")
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    lines = ["# Generations (greedy)", ""]
    for row in result["generations"]:
        lines += [f"## {row['prompt']}", ""]
        for key in ("base", "finetuned", "output"):
            if key in row:
                lines += [f"**{key}:**", "", row[key] or "(empty)", ""]
    (run_dir / "generations.md").write_text("\n".join(lines))


register_presets()
