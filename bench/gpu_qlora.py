"""QLoRA on a CUDA GPU: step time and peak GPU memory of bf16 LoRA vs loralab QLoRA vs PEFT + bitsandbytes.

Needs a CUDA device (run it where one is lent; ``scripts/gpu_check.sh`` runs it with the CUDA tests).
Variants (r=8, alpha=16 on q_proj, v_proj; bf16 compute; fp32 adapters; torch AdamW on the adapter):
  lora_bf16 -- bf16 base (transformers from_pretrained) + loralab LoRA
  qlora     -- loralab NF4 + double quant base (streamed from the checkpoint in 4 bits, then moved to
               the GPU), bf16 compute, + loralab LoRA
  peft_bnb  -- transformers from_pretrained with BitsAndBytesConfig(nf4, double quant, bf16 compute)
               on the GPU + PEFT LoRA (skipped when bitsandbytes or peft is missing)
Every variant loads the same random bf16 checkpoint (bench/qlora_step.py's writer) in a fresh process.

TIME   (~135M Llama shape, batch 8 x 512): median step time (forward, backward, AdamW step; CUDA
       synchronised) over 10 steps after 3 warmup steps; one run per variant per round, order rotated;
       each ratio is the median over rounds of the within-round ratio.
MEMORY (Llama-3.2-1B shape, batch 4 x 512, gradient checkpointing): peak ``torch.cuda.max_memory_allocated``
       over 3 steps, and the memory the loaded model holds before the first step.
Writes bench/results/gpu_qlora.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_step  # noqa: E402
from qlora_step import SHAPES, write_checkpoint  # noqa: E402

VARIANTS = ("lora_bf16", "qlora", "peft_bnb")
GPU_BATCH = {"135m": (8, 512), "1b": (4, 512)}
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_qlora.json"


def _build(variant: str, ckpt: Path, checkpointing: bool):
    """bench/qlora_step.py's builder, in bf16 on the GPU (``lora_bf16`` is its ``lora`` variant)."""
    import torch

    return qlora_step._build("lora" if variant == "lora_bf16" else variant, ckpt, checkpointing,
                             dtype=torch.bfloat16, device="cuda")


def worker(variant: str, shape: str, warmup: int, steps: int, checkpointing: bool, ckpt: Path) -> dict:
    import torch

    torch.manual_seed(0)
    start = time.perf_counter()
    model = _build(variant, ckpt, checkpointing)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    loaded_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch, seq = GPU_BATCH[shape]
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to("cuda")
    times, losses = [], []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"variant": variant, "shape": shape, "batch": [batch, seq], "step_s": times, "losses": losses,
            "load_s": load_s, "trainable": sum(p.numel() for p in trainable), "loaded_bytes": loaded_bytes,
            "peak_bytes": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__}


def _available(variant: str) -> bool:
    if variant != "peft_bnb":
        return True
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as exc:
        print(f"  peft_bnb skipped: {exc}")
        return False
    return True


def _run_worker(variant: str, shape: str, warmup: int, steps: int, checkpointing: bool, ckpt: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", variant, "--shape", shape, "--warmup", str(warmup),
           "--steps", str(steps), "--ckpt", str(ckpt)] + (["--checkpointing"] if checkpointing else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if proc.returncode != 0:
        print(f"  {variant}/{shape} worker FAILED:\n{proc.stderr[-3000:]}", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {variant:9s} {shape}: median step {statistics.median(result['step_s']) * 1e3:.1f} ms, "
          f"peak {result['peak_bytes'] / 2**30:.2f} GiB (model {result['loaded_bytes'] / 2**30:.2f} GiB), "
          f"loss {result['losses'][-1]:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--ckpt-dir", type=Path, default=Path(tempfile.gettempdir()) / "loralab_qlora_bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=("135m", "1b"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, args.warmup, args.steps, args.checkpointing, args.ckpt)))
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_qlora.py needs a CUDA device")
    variants = [v for v in VARIANTS if _available(v)]
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "variants": variants,
                 "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))

    ckpt = write_checkpoint("135m", args.ckpt_dir / "135m")
    print(f"TIME 135M shape, batch {GPU_BATCH['135m']}, {args.rounds} rounds of {args.warmup} warmup + "
          f"{args.steps} steps")
    per_round: list[dict[str, float]] = []
    out["runs_135m"] = []
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        per_round.append({})
        for variant in order:
            result = _run_worker(variant, "135m", args.warmup, args.steps, False, ckpt)
            if result:
                per_round[-1][variant] = statistics.median(result["step_s"])
                out["runs_135m"].append(result)
        save()
    for a, b in (("qlora", "lora_bf16"), ("qlora", "peft_bnb"), ("peft_bnb", "lora_bf16")):
        pairs = [x[a] / x[b] for x in per_round if a in x and b in x]
        if pairs:
            out[f"{a}_over_{b}_time"] = statistics.median(pairs)
            print(f"  {a}/{b} step time: {out[f'{a}_over_{b}_time']:.3f}")
    save()
    if not args.skip_memory:
        ckpt = write_checkpoint("1b", args.ckpt_dir / "1b")
        print(f"MEMORY 1B shape, batch {GPU_BATCH['1b']}, gradient checkpointing, 3 steps")
        peak, loaded = {}, {}
        for variant in variants:
            result = _run_worker(variant, "1b", 0, 3, True, ckpt)
            if result:
                peak[variant], loaded[variant] = result["peak_bytes"], result["loaded_bytes"]
                out.setdefault("runs_1b", []).append(result)
        out["peak_bytes_1b"], out["loaded_bytes_1b"] = peak, loaded
        for a, b in (("qlora", "lora_bf16"), ("qlora", "peft_bnb")):
            if a in peak and b in peak:
                out[f"{a}_over_{b}_peak_memory"] = peak[a] / peak[b]
                print(f"  {a}/{b} peak GPU memory: {peak[a] / peak[b]:.3f}")
        save()


if __name__ == "__main__":
    main()
