"""Peak memory and wall time of instruction tuning: QLoRA (with / without gradient checkpointing),
fp32 LoRA, and an estimate for full fine-tuning -- the resource table of the QLoRA study.

Each variant runs in a FRESH subprocess (so ``ru_maxrss``, the process's peak resident set size, is
its own): build the instruct experiment (model load, LoRA injection, GSM8K tokenization), then
``--steps`` optimizer steps of the real task loss with AdamW. Per variant we record

* ``rss_after_build_mb``  -- RSS once the model is built (weights + tokenized data + Python/torch);
* ``peak_rss_mb``         -- ``getrusage(RUSAGE_SELF).ru_maxrss`` after the steps (load + train peak);
* ``train_peak_extra_mb`` -- peak minus after-build: activations, logits, gradients, optimizer state;
* ``step_seconds``        -- mean wall time per step (steps after the first; the first is reported apart).

Full fine-tuning is NOT run (it would not fit the time budget on CPU); it is estimated as
``fp32 LoRA after-build RSS + P * (4 grad + 8 AdamW) bytes + fp32 LoRA's train_peak_extra`` where
P is the number of base parameters: full FT keeps the same fp32 weights as fp32 LoRA, adds a
gradient and two Adam moments per weight, and its activations are at least those of LoRA at the
same batch (LoRA's backward already propagates through every layer; the extra weight-gradient
matmuls need no extra saved tensors beyond what LoRA saves for the input gradients).
The step time of full FT is estimated as fp32 LoRA's (same forward/backward chain) -- a lower bound.

    python bench/instruct_resources.py            # smollm2-135m, 3 steps of 4 x <=320 tokens per variant
    python bench/instruct_resources.py --quick    # a tiny random Llama, 2 steps: < 1 minute
    python bench/instruct_resources.py --run-dir runs/x   # also writes runs/x/resources.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> config overrides on top of the quickstart preset
    "qlora_gc": ["model.quantize=nf4", "model.double_quant=true", "model.gradient_checkpointing=true"],
    "qlora": ["model.quantize=nf4", "model.double_quant=true", "model.gradient_checkpointing=false"],
    "lora_fp32": ["model.quantize=none", "model.gradient_checkpointing=false"],
}
LABELS = {"qlora_gc": "QLoRA NF4+DQ, grad checkpointing", "qlora": "QLoRA NF4+DQ", "lora_fp32": "LoRA, fp32 base",
          "full_ft_estimate": "full fine-tuning (estimate)"}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(overrides: list[str], steps: int) -> dict:
    """One variant, in this (fresh) process."""
    import torch

    from loralab.engine.config import load_config
    from loralab.tasks.instruct.experiment import EXPERIMENT

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg = load_config(None, overrides, preset="quickstart")
    t0 = time.perf_counter()
    built = EXPERIMENT.build(cfg)
    model, task = built.model, built.task
    build_s = time.perf_counter() - t0
    rss_build = _rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    model.train()
    times, losses = [], []
    bs = cfg.train.batch_size
    for step in range(steps):
        batch = task.collate([task.train_dataset[(step * bs + i) % len(task.train_dataset)] for i in range(bs)])
        t = time.perf_counter()
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    packed = sum(b.numel() for n, b in model.named_buffers() if n.endswith(".weight") and b.dtype == torch.uint8)
    return {"rss_after_build_mb": rss_build, "peak_rss_mb": peak, "train_peak_extra_mb": peak - rss_build,
            "first_step_seconds": times[0], "step_seconds": sum(times[1:]) / max(1, len(times) - 1) if steps > 1
            else times[0], "build_seconds": build_s, "losses": losses, "trainable_params": sum(p.numel() for p in params),
            "base_params_unquantized": base_params, "packed_4bit_bytes": packed,
            "tokens_per_step": int(batch["attention_mask"].sum()), "batch_shape": list(batch["input_ids"].shape)}


def _run_variant(name: str, overrides: list[str], steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(overrides), "--steps", str(steps)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t
    return out


def full_ft_estimate(lora_fp32: dict, n_params: int) -> dict:
    """See the module docstring: fp32 weights (already in the fp32 LoRA RSS) + grads + Adam moments
    + at least fp32 LoRA's activation peak."""
    extra_state_mb = n_params * (4 + 8) / 2**20
    return {"peak_rss_mb": lora_fp32["rss_after_build_mb"] + extra_state_mb + lora_fp32["train_peak_extra_mb"],
            "step_seconds": lora_fp32["step_seconds"], "estimated": True, "grad_and_adam_mb": extra_state_mb,
            "params": n_params}


def markdown(table: dict) -> str:
    rows = ["| variant | peak RSS (MB) | after build (MB) | train extra (MB) | s / step |",
            "|---|---:|---:|---:|---:|"]
    for name, r in table["variants"].items():
        est = r.get("estimated")
        rows.append(f"| {LABELS.get(name, name)} | {'~' if est else ''}{r['peak_rss_mb']:,.0f} | "
                    f"{'' if est else format(r['rss_after_build_mb'], ',.0f')} | "
                    f"{'' if est else format(r['train_peak_extra_mb'], ',.0f')} | "
                    f"{'>= ' if est else ''}{r['step_seconds']:.2f} |")
    return "\n".join(rows) + "\n\n" + table["note"] + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama, 2 steps (under a minute)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default bench/results/...)")
    ap.add_argument("--run-dir", type=Path, default=None, help="also write resources.json / resources.md here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.steps)))
        return 0
    common = ["data.train_samples=32", "data.eval_samples=2"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from loralab.models.tiny import tiny_model, tiny_tokenizer

            tiny_model("llama", "causal_lm", max_position_embeddings=512).save_pretrained(Path(tmp) / "tiny")
            tiny_tokenizer("llama", model_max_length=512).save_pretrained(Path(tmp) / "tiny")
            common = [f"model.name={Path(tmp) / 'tiny'}", "data.train_samples=8", "data.eval_samples=2",
                      "data.max_length=256", "model.quant_block_size=32"]
            steps = 2
        else:
            steps = args.steps
        table: dict = {"model": "tiny-llama" if args.quick else "smollm2-135m", "steps": steps,
                       "threads": int(os.environ.get("BENCH_THREADS", "2")), "load_average_start": os.getloadavg(),
                       "variants": {}}
        for name, overrides in VARIANTS.items():
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            table["variants"][name] = _run_variant(name, overrides + common, steps)
    lora = table["variants"]["lora_fp32"]
    table["variants"]["full_ft_estimate"] = full_ft_estimate(lora, lora["base_params_unquantized"])
    table["load_average_end"] = os.getloadavg()
    table["note"] = ("Peak RSS = getrusage ru_maxrss of a fresh process per variant (load + build + train). "
                     "Full fine-tuning is estimated, not run: fp32 LoRA's after-build RSS + params x 12 bytes "
                     "(fp32 gradient + two AdamW moments) + fp32 LoRA's training peak extra; its step time is "
                     f"at least fp32 LoRA's. Load average {table['load_average_start'][0]:.1f} -> "
                     f"{table['load_average_end'][0]:.1f} on a shared 2-core box: wall times are inflated by load.")
    md = markdown(table)
    print(md)
    out = args.out or ROOT / "bench" / "results" / ("instruct_resources_quick.json" if args.quick
                                                    else "instruct_resources.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    if args.run_dir:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        (args.run_dir / "resources.json").write_text(json.dumps(table, indent=2) + "\n")
        (args.run_dir / "resources.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
