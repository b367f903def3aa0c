"""The final evaluation of an instruct run, in the order that keeps it honest.

1. resources (peak RSS of load + train) before anything else runs;
2. the adapter guard (``eval.assert_adapter_present``): a zero or detached adapter is an error, not a result;
3. held-out loss base -> fine-tuned (the base from the baseline measured before training), GSM8K exact
   match base -> fine-tuned, side-by-side generations, optional LLM-judge scores;
4. the adapter, ``instruct_result.json``, ``generations.md``, ``summary.txt`` and ``resources.json``
   written to the run dir, and the summary block printed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from loralab.engine.experiment import Built
from loralab.tasks.common.results import save_trained

RESULT_FILE = "instruct_result.json"
STUDY_MAX_NEW_TOKENS = 48


def evaluate_run(built: Built, fit: Any, run_dir: str | Path | None) -> dict[str, Any]:
    from loralab.core.inject import disable_adapters, trainable_report
    from loralab.core.memory import memory_report
    import loralab.tasks.instruct.eval as ev
    import loralab.tasks.instruct.summary as qs

    cfg, model, tokenizer = built.state["cfg"], built.model, built.state["tokenizer"]
    resources = qs.measure_resources(fit)  # before evaluation: the peak of load + train
    held, batch = built.state["held"], built.state["eval_batch"]
    base_only = cfg.lora.method == "lora" and fit is None and not cfg.lora.init_from
    result: dict[str, Any] = {"task": cfg.data.task, "model": cfg.model.name, "quantize": cfg.model.quantize,
                              "method": cfg.lora.method, "base_only": base_only,
                              "fit": fit.to_dict() if hasattr(fit, "to_dict") else fit}
    gen_kw = {"max_new_tokens": cfg.generate.max_new_tokens, "batch_size": cfg.generate.batch_size,
              "system_prompt": cfg.data.system_prompt, "gen": cfg.generate}
    show = not cfg.train.quiet
    # the study's short prompts need no long answers; a cap keeps them from dominating eval time
    study_kw = {**gen_kw, "max_new_tokens": min(STUDY_MAX_NEW_TOKENS, cfg.generate.max_new_tokens), "progress": show}
    adapter = cfg.lora.method == "lora" and not base_only
    base = built.baseline.metrics if built.baseline else None
    if adapter:  # the guard runs before any scoring
        result["adapter_check"] = ev.assert_adapter_present(model, built.task.collate(held[:4]))
        tuned = ev.scored_heldout_loss(model, held, built.task.collate, batch, show and "held-out loss (fine-tuned)")
        result["generations"] = ev.side_by_side(model, tokenizer, ev.STUDY_PROMPTS, **study_kw)
    else:
        scope = disable_adapters(model)  # a model without adapters is itself
        with scope:  # base_only: the zero adapter is off; full / bitfit: the model itself
            tuned = ev.scored_heldout_loss(model, held, built.task.collate, batch, show and "held-out loss")
            result["generations"] = [{"prompt": p, "output": o} for p, o in
                                     zip(ev.STUDY_PROMPTS, ev.generate(model, tokenizer, ev.STUDY_PROMPTS, **study_kw))]
    base = base or tuned
    result["heldout"] = {"finetuned_loss": tuned["eval_loss"], "finetuned_ppl": tuned["eval_ppl"],
                         "base_loss": base["eval_loss"], "base_ppl": base["eval_ppl"], "tokens": tuned["eval_tokens"]}
    if cfg.data.task == "gsm8k":
        problems = built.state["held_records"]
        label = "GSM8K (fine-tuned)" if adapter else "GSM8K"
        result["gsm8k"] = {"finetuned": ev.gsm8k_exact_match(model, tokenizer, problems, **gen_kw,
                                                             progress=show and label)}
        if adapter:
            with disable_adapters(model):
                result["gsm8k"]["base"] = ev.gsm8k_exact_match(model, tokenizer, problems, **gen_kw,
                                                               progress=show and "GSM8K (base)")
    result["judge"] = _judge(result["generations"])
    resources["eval_seconds"] = time.time() - resources.pop("measured_at")
    result["train_data"] = built.state["data_stats"]
    result["resources"] = resources
    memory = memory_report(model)
    result["memory"] = memory.as_dict()
    if run_dir is not None:
        _write(result, model, Path(run_dir), adapter)
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
    from loralab.tasks.instruct.judge import JudgeError, judge_scores

    if not os.environ.get("LORALAB_JUDGE_URL"):
        return {"skipped": "LORALAB_JUDGE_URL not set"}
    try:
        return {"scores": [{"prompt": r["prompt"], **dict(zip(("base", "finetuned"),
                                                              judge_scores(r["prompt"], [r["base"], r["finetuned"]])))}
                           if "base" in r else {"prompt": r["prompt"], "output": judge_scores(r["prompt"], [r["output"]])[0]}
                           for r in rows]}
    except JudgeError as e:  # the judge is optional: its failure must not lose the trained run
        return {"error": str(e)}


def _write(result: dict, model: Any, run_dir: Path, adapter: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    result["run_dir"] = str(run_dir)
    if adapter:
        result["adapter_dir"] = save_trained(model, run_dir)
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    lines = ["# Generations (greedy)", ""]
    for row in result["generations"]:
        lines += [f"## {row['prompt']}", ""]
        for key in ("base", "finetuned", "output"):
            if key in row:
                lines += [f"**{key}:**", "", row[key] or "(empty)", ""]
    (run_dir / "generations.md").write_text("\n".join(lines))
