"""bf16 vs fp32 training steps on the CPU: loralab LoRA and QLoRA beside PEFT, SmolLM2-135M, batch 4 x 256.

Variants (LoRA r=16, alpha=32 on every linear layer but the head; AdamW on the adapter; the real
SmolLM2-135M-Instruct weights from the zoo; random token ids, the same in every variant):

  loralab_lora_fp32 / _bf16   -- the engine's path: ``model.compute_dtype`` float32 / bfloat16
                                 (core.precision.cast_frozen + bf16 autocast) and the task loss of
                                 tasks.common.causal_lm (the fused LM head + cross-entropy)
  loralab_qlora_fp32 / _bf16  -- the same over an NF4 + double-quantized base decoded to fp32 / bf16
  peft_fp32 / peft_bf16       -- transformers + PEFT as its users run it: the model loaded in fp32 or
                                 bf16 (PEFT keeps the adapter in fp32), ``model(ids, labels=ids).loss``

Each (round, variant) is a fresh subprocess (its own peak RSS, first-use costs included in its warm-up):
``--warmup`` steps untimed, then ``--steps`` timed steps (forward, backward, optimizer step); the
variant's time for that round is the median of its steps. The order of the variants rotates every
round. Reported per variant: median over rounds of tokens/s, the spread (min/max round), the worst
round's ratio to the median, and the peak RSS; the ratios are medians over rounds of the within-round
ratios. Targets (issue #15): lora bf16 >= 1.6x lora fp32, lora bf16 >= 1.0x the faster PEFT variant,
qlora bf16 >= 1.4x qlora fp32, bf16 peak RSS <= fp32 peak RSS, no round slower than 1.3x its median.

    python bench/cpu_bf16.py                 # 5 rounds, 2 warm-up + 3 timed steps: ~15 minutes on 2 cores
    python bench/cpu_bf16.py --quick         # 1 round, 1 + 1 steps, batch 1 x 64 (a smoke run)
Writes bench/results/cpu_bf16.json (cpu_bf16_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["loralab_lora_fp32", "loralab_lora_bf16", "loralab_qlora_fp32", "loralab_qlora_bf16",
            "peft_fp32", "peft_bf16"]
TARGETS = {"lora_bf16_over_fp32": 1.6, "lora_bf16_over_best_peft": 1.0, "qlora_bf16_over_fp32": 1.4,
           "worst_round_over_median": 1.3}


def _build(variant: str):
    import torch

    from loralab.models.zoo import load_model, resolve

    bf16 = variant.endswith("bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(resolve("smollm2-135m")), dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        return model, dtype
    from loralab.core.config import LoraConfig
    from loralab.core.inject import inject_adapter
    from loralab.core.precision import cast_frozen

    quant = {"quantize": "nf4", "double_quant": True, "compute_dtype": dtype} if "qlora" in variant else {}
    model = load_model("smollm2-135m", "causal_lm", **quant)
    model.requires_grad_(False)
    inject_adapter(model, LoraConfig(r=16, lora_alpha=32.0, target_modules="all-linear",
                                     exclude_modules=["lm_head"]))
    cast_frozen(model, dtype)
    return model, dtype


def worker(variant: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    import torch

    from loralab.core.precision import compute_context
    from loralab.tasks.common.causal_lm import mean_token_loss

    model, dtype = _build(variant)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), "adapters must train in float32"
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> float:
        if variant.startswith("peft"):
            loss = model(input_ids=ids, attention_mask=data["attention_mask"], labels=ids).loss
        else:
            with compute_context(dtype):
                loss = mean_token_loss(model, data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"step_seconds": statistics.median(times), "steps": times, "first_loss": losses[0],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def _run(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--batch", str(args.batch), "--seq", str(args.seq),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.warmup, args.steps)))
        return
    if args.quick:
        args.rounds, args.batch, args.seq, args.warmup, args.steps = 1, 1, 64, 1, 1
    variants = args.variants.split(",")
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        got = {}
        for v in order:
            got[v] = _run(v, args)
            print(f"round {r + 1}/{args.rounds} {v:20s} {got[v]['step_seconds']:.3f} s/step "
                  f"rss {got[v]['peak_rss_mb']:.0f} MB", flush=True)
        rounds.append(got)
    tokens = args.batch * args.seq
    summary = {}
    for v in variants:
        secs = [rd[v]["step_seconds"] for rd in rounds]
        med = statistics.median(secs)
        summary[v] = {"tokens_per_second": tokens / med, "step_seconds_median": med, "step_seconds_min": min(secs),
                      "step_seconds_max": max(secs), "worst_round_over_median": max(secs) / med,
                      "peak_rss_mb": max(rd[v]["peak_rss_mb"] for rd in rounds)}

    def ratio(fast: str, slow: str | list[str]) -> float | None:
        slows = [slow] if isinstance(slow, str) else slow
        if fast not in variants or not all(s in variants for s in slows):
            return None
        return statistics.median(min(rd[s]["step_seconds"] for s in slows) / rd[fast]["step_seconds"] for rd in rounds)

    ratios = {"lora_bf16_over_fp32": ratio("loralab_lora_bf16", "loralab_lora_fp32"),
              "lora_bf16_over_best_peft": ratio("loralab_lora_bf16", ["peft_fp32", "peft_bf16"]),
              "qlora_bf16_over_fp32": ratio("loralab_qlora_bf16", "loralab_qlora_fp32"),
              "peft_bf16_over_fp32": ratio("peft_bf16", "peft_fp32"),
              "lora_fp32_over_peft_fp32": ratio("loralab_lora_fp32", "peft_fp32")}
    worst = max(s["worst_round_over_median"] for s in summary.values())
    rss = {k: summary.get(f"loralab_{k}_bf16", {}).get("peak_rss_mb", 0) <= summary.get(f"loralab_{k}_fp32", {}).get(
        "peak_rss_mb", float("inf")) for k in ("lora", "qlora")}
    met = {k: (ratios[k] is not None and ratios[k] >= t) for k, t in TARGETS.items() if k in ratios}
    met["worst_round_over_median"] = worst <= TARGETS["worst_round_over_median"]
    met.update({f"{k}_bf16_rss_le_fp32": v for k, v in rss.items()})
    import torch

    result = {"benchmark": "cpu_bf16", "shape": {"model": "smollm2-135m", "batch": args.batch, "seq": args.seq,
                                                 "lora": "r=16 alpha=32 all-linear but lm_head"},
              "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps, "summary": summary,
              "ratios": ratios, "targets": TARGETS, "met": met, "per_round": rounds,
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
                          "amx": bool(torch.cpu._is_amx_tile_supported()),
                          "torch": torch.__version__, "load_avg_at_end": os.getloadavg()}}
    for v, s in summary.items():
        print(f"{v:20s} {s['tokens_per_second']:8.0f} tok/s  {s['step_seconds_median']:.3f} s/step "
              f"(rounds {s['step_seconds_min']:.3f}-{s['step_seconds_max']:.3f})  peak RSS {s['peak_rss_mb']:.0f} MB")
    for k, v in ratios.items():
        print(f"{k:28s} {'-' if v is None else f'{v:.2f}x'}")
    print("targets met:", met)
    out = ROOT / "bench" / "results" / ("cpu_bf16_quick.json" if args.quick else "cpu_bf16.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
