"""``loralab quickstart``: the end-of-run summary of an instruction-tuning run, and its resource row.

The quickstart is the ``quickstart`` preset of the instruct experiment (see
:mod:`loralab.tasks.instruct_presets`): QLoRA (NF4 + double quantization) on SmolLM2-135M-Instruct,
GSM8K problems. ``instruct.report`` calls ``measure_resources`` *before* any evaluation, so the peak
RSS it records is what loading + training cost, then ``format_summary`` for the block it prints:

* held-out assistant-token loss (and perplexity = exp(loss)) of the base model -> the fine-tuned one;
* GSM8K exact match base -> fine-tuned (greedy), and two of those held-out answers side by side;
* the memory the model holds by role and format (``core.memory.memory_report``: the 4-bit packed
  base, its quantization state, the fp32 LoRA weights) and the measured peak RSS and wall times;
* where the adapter was saved.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

WIDTH = 100


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux /proc), None where unknown."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def measure_resources(fit_result: Any) -> dict[str, float | None]:
    """Peak RSS and wall times so far (call right after training, before evaluating)."""
    train_s = getattr(fit_result, "train_seconds", None)
    if isinstance(fit_result, dict):
        train_s = fit_result.get("train_seconds")
    return {"peak_rss_mb": peak_rss_bytes() / 2**20, "train_seconds": train_s,
            "process_seconds_before_eval": process_age_seconds(), "measured_at": time.time()}


def train_loss_curve(run_dir: str | Path | None, window: int = 4) -> tuple[float, float] | None:
    """(mean train loss of the first ``window`` steps, of the last ``window``) from metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return None
    losses = [r["train/loss"] for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]
    if not losses:
        return None
    k = max(1, min(window, len(losses) // 2))
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def _clip(text: str, width: int, lines: int = 4) -> list[str]:
    flat = " ".join((text or "(empty)").split())
    wrapped = textwrap.wrap(flat, width) or [""]
    return wrapped[:lines - 1] + [wrapped[lines - 1][: width - 3] + "..."] if len(wrapped) > lines else wrapped


def _side_by_side(rows: list[dict], n: int = 2) -> list[str]:
    out: list[str] = []
    half = (WIDTH - 7) // 2
    for i, row in enumerate(rows[:n], 1):
        out.append(f"  [{i}] {' '.join(row['prompt'].split())[: WIDTH - 6]}")
        if "reference" in row:
            out.append(f"      reference answer: {row['reference']}")
        base, tuned = _clip(row["base"], half, 6), _clip(row["finetuned"], half, 6)
        out.append(f"      {'base' + (' (pred ' + str(row['base_pred']) + ')' if 'base_pred' in row else ''):<{half}} | "
                   f"{'fine-tuned' + (' (pred ' + str(row['tuned_pred']) + ')' if 'tuned_pred' in row else '')}")
        for j in range(max(len(base), len(tuned))):
            left = base[j] if j < len(base) else ""
            right = tuned[j] if j < len(tuned) else ""
            out.append(f"      {left:<{half}} | {right}")
    return out


def _share(scored: dict, key: str) -> str:
    """'k/n' of the records with ``key`` true (records of older runs without the key count as false)."""
    return f"{sum(bool(r.get(key)) for r in scored['records'])}/{scored['n']}"


def gsm8k_pairs(result: dict) -> list[dict]:
    """Held-out GSM8K problems with the base and fine-tuned answers, from the exact-match records."""
    g = result.get("gsm8k", {})
    if "base" not in g:
        return []
    return [{"prompt": t["question"], "reference": t["reference"], "base": b["output"], "finetuned": t["output"],
             "base_pred": b["prediction"], "tuned_pred": t["prediction"]}
            for b, t in zip(g["base"]["records"], g["finetuned"]["records"])]


def format_summary(cfg: Any, result: dict, memory_table: str, trainable: str,
                   loss_curve: tuple[float, float] | None = None) -> str:
    """The readable block printed at the end of an instruct run (module docstring)."""
    m, lo, h = cfg.model, cfg.lora, result["heldout"]
    quant = f"{m.quantize.upper()}{' + double quant' if m.double_quant else ''}, {m.compute_dtype} compute" \
        if m.quantize != "none" else f"{m.dtype} (not quantized)"
    title = f" {('QLoRA' if m.quantize != 'none' else 'LoRA')} fine-tuning: {m.name} on {cfg.data.task} "
    lines = [f"{title:=^{WIDTH}}",
             f"base model     {m.name}: {quant}; gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}",
             f"adapter        {lo.method} r={lo.r} alpha={lo.lora_alpha:g} on {lo.target_modules}"
             + (f" except {lo.exclude_modules}" if lo.exclude_modules else "") + f"; {trainable}"]
    d = result.get("train_data") or {}
    if d:
        lines.append(f"data           {cfg.data.task}: {d['conversations']} training conversations, "
                     f"{d['truncated']} ({100 * d['truncated_fraction']:.1f}%) cut at max_length {d['max_length']}; "
                     f"system prompt {cfg.data.system_prompt!r}")
    fit = result.get("fit") or {}
    if fit:
        steps, secs = fit.get("global_step", 0), fit.get("train_seconds", 0.0)
        text = (f"training       {steps} steps x {cfg.train.batch_size * cfg.train.grad_accum} examples, "
                f"{secs:.0f} s ({fit.get('tokens_per_second', 0):,.0f} tokens/s)")
        if loss_curve:
            text += f"; train loss {loss_curve[0]:.3f} -> {loss_curve[1]:.3f} (first -> last steps)"
        lines.append(text)
    if "adapter_check" in result:
        a = result["adapter_check"]
        lines.append(f"adapter check  passed: {int(a['lora_layers'])} active LoRA layers, all lora_B non-zero; "
                     f"max |logit change| vs base {a['max_logit_change']:.3g}")
    if "base_loss" in h:
        lines.append(f"held-out loss  {h['base_loss']:.4f} -> {h['finetuned_loss']:.4f}   "
                     f"(perplexity {h['base_ppl']:.2f} -> {h['finetuned_ppl']:.2f}; base -> fine-tuned, "
                     f"{int(h['tokens'])} assistant tokens)")
    else:
        lines.append(f"held-out loss  {h['eval_loss']:.4f} (perplexity {h['eval_ppl']:.2f})")
    g = result.get("gsm8k")
    if g:
        tuned = g["finetuned"]
        right = sum(r["correct"] for r in tuned["records"])
        if "base" in g:
            base_right = sum(r["correct"] for r in g["base"]["records"])
            lines.append(f"GSM8K exact    {base_right}/{g['base']['n']} -> {right}/{tuned['n']} "
                         f"(greedy, <= {cfg.generate.max_new_tokens} new tokens; base -> fine-tuned)")
            lines.append(f"answer format  {_share(g['base'], 'answer_format')} -> {_share(tuned, 'answer_format')} "
                         "end in '#### <number>'")
            lines.append(f"looping        {_share(g['base'], 'loops')} -> {_share(tuned, 'loops')} repeat an "
                         "8-token sequence 3+ times")
        else:
            lines.append(f"GSM8K exact    {right}/{tuned['n']} (greedy); answer format "
                         f"{_share(tuned, 'answer_format')}; looping {_share(tuned, 'loops')}")
    r = result.get("resources") or {}
    if r:
        proc = r.get("process_seconds_before_eval")
        lines.append(f"resources      peak RSS {r['peak_rss_mb']:,.0f} MB (load + train); train wall "
                     f"{r.get('train_seconds') or 0:.0f} s" + (f"; process wall before eval {proc:.0f} s" if proc else "")
                     + (f"; evaluation {r['eval_seconds']:.0f} s" if "eval_seconds" in r else ""))
    lines += ["memory held by the model (MB; the 4-bit packed base is 2 weights per byte):"]
    lines += ["  " + row for row in memory_table.splitlines()]
    pairs = gsm8k_pairs(result) or [row for row in result.get("generations", []) if "base" in row]
    if pairs:
        lines.append("generations (greedy), base vs fine-tuned:")
        lines += _side_by_side(pairs)
    if result.get("adapter_dir"):
        lines.append(f"adapter saved  {result['adapter_dir']}  (PEFT format; run dir {result.get('run_dir')})")
        lines.append(f"               evaluate again: loralab eval {result.get('run_dir')}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)
