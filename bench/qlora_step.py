"""QLoRA training step: time and peak memory of fp32 LoRA vs loralab QLoRA vs PEFT + bitsandbytes QLoRA.

Variants (r=8, alpha=16 on q_proj, v_proj; torch AdamW on the adapter; fp32 compute everywhere):
  lora     -- fp32 base (transformers from_pretrained, dtype fp32) + loralab LoRA
  qlora    -- loralab NF4 + double quant base loaded layer by layer from the checkpoint (never a
              full-precision model in memory) + loralab LoRA; weights decoded by the native kernel
              (loralab.core.native) when it builds, as a user gets by default
  qlora_torch -- the same with LORALAB_NATIVE=0: the pure-torch decode (timing only)
  peft_bnb -- transformers from_pretrained with BitsAndBytesConfig(nf4, double quant, fp32 compute) +
              PEFT LoRA
Every variant loads the same random bf16 safetensors checkpoint (written once, shard per layer, into a
temp dir) and runs in a fresh subprocess.

TIME  (~135M Llama shape, batch 4 x seq 128, no checkpointing): step time (forward, backward, optimizer
      step) after warmup; one run per variant per round, the order rotated each round; every ratio is
      the median over rounds of the within-round ratio of median step times.
MEMORY (Llama-3.2-1B shape, batch 1 x 128, gradient checkpointing on for all): peak RSS of the whole
      worker process (getrusage ru_maxrss: includes imports, loading and three steps), one variant at
      a time.
Writes bench/results/qlora_step.json. ``--quick`` skips the 1B shape and times a 4-layer cut of the 135M
shape (batch 1) for one round of 1 warmup + 2 steps; it writes bench/results/qlora_step_quick.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, batch=4, seq=128),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, batch=1, seq=128),
}
# --quick smoke shape: the 135M widths and vocabulary but 4 layers, batch 1 x 128 (a loaded 2-core box
# needs ~1 min per 135M step; the ratios from this shape are a smoke check, not the result)
SHAPES["135m-quick"] = dict(SHAPES["135m"], num_hidden_layers=4, batch=1)
VARIANTS = ("lora", "qlora", "peft_bnb")
TIME_VARIANTS = VARIANTS + ("qlora_torch",)
TARGETS = ["q_proj", "v_proj"]
RESULTS = Path(__file__).resolve().parent / "results" / "qlora_step.json"


def _llama_config(shape: str):
    from transformers import LlamaConfig

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")}
    return LlamaConfig(max_position_embeddings=2048, **spec)


def write_checkpoint(shape: str, directory: Path) -> Path:
    """Random bf16 checkpoint, one safetensors shard per decoder layer, written tensor by tensor from a
    meta model (the full model never exists in memory). Reused when already complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    done = directory / "COMPLETE"
    if done.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = _llama_config(shape)
    config.save_pretrained(directory)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    shard_of = {n: f"layer{n.split('.')[2]}" if n.startswith("model.layers.") else "rest" for n in shapes}
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for shard in dict.fromkeys(shard_of.values()):
        tensors = {}
        for name in (n for n in shapes if shard_of[n] == shard):
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
            total += tensors[name].numel() * 2
            weight_map[name] = f"{shard}.safetensors"
        save_file(tensors, str(directory / f"{shard}.safetensors"), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    done.write_text("ok")
    return directory


def _build(variant: str, ckpt: Path, checkpointing: bool, dtype=None, device: str = "cpu"):
    """One variant's model, in ``dtype`` (default fp32: weights and compute) on ``device``; bench/gpu_qlora.py
    builds its bf16 CUDA variants here too."""
    import torch

    dtype = dtype or torch.float32
    if variant == "peft_bnb":
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                                     device_map=device)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=TARGETS))
    else:
        from loralab.core.config import LoraConfig
        from loralab.core.inject import inject_adapter

        if variant == "lora":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map=device)
        else:
            model = _load_loralab_4bit(ckpt, dtype).to(device)
        model.requires_grad_(False)
        inject_adapter(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
        model.to(device)
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # older 5.x (as on some GPU images)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


def _load_loralab_4bit(ckpt: Path, dtype):
    """Meta model + loralab's streaming 4-bit loader (NF4, double quant, ``dtype`` compute): each Linear
    weight is quantized as it is read, so no full-precision copy of the linears ever exists."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loralab.core.quant_io import load_model_4bit

    config = AutoConfig.from_pretrained(ckpt)
    return load_model_4bit(ckpt, lambda: AutoModelForCausalLM.from_config(config, dtype=dtype),
                           quant_type="nf4", double_quant=True, compute_dtype=dtype,
                           skip_modules=("lm_head",))


def worker(variant: str, shape: str, warmup: int, steps: int, checkpointing: bool, ckpt: Path) -> dict:
    import torch

    from loralab.core import native
    from loralab.core.memory import memory_report

    torch.manual_seed(0)
    start = time.perf_counter()
    model = _build(variant, ckpt, checkpointing)
    load_s = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    spec = SHAPES[shape]
    ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(1))
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"variant": variant, "shape": shape, "step_s": times, "losses": losses, "load_s": load_s,
            "trainable": sum(p.numel() for p in trainable),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "memory_report": memory_report(model, optimizer).as_dict(), "native_decode": native.status()}


def _run_worker(variant: str, shape: str, warmup: int, steps: int, checkpointing: bool, ckpt: Path,
                threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--shape", shape, "--warmup", str(warmup),
           "--steps", str(steps), "--ckpt", str(ckpt), "--threads", str(threads)]
    if checkpointing:
        cmd.append("--checkpointing")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if variant == "qlora_torch":
        env["LORALAB_NATIVE"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}/{shape} worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {variant:11s} {shape}: steps {[round(t, 2) for t in result['step_s']]} s, "
          f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, loss {result['losses'][-1]:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4-layer 135M cut, 1 round, no 1B")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the timing runs")
    parser.add_argument("--time-steps", type=int, default=3, help="timed steps per timing run (after 1 warmup)")
    parser.add_argument("--mem-steps", type=int, default=3, help="steps per 1B memory run")
    parser.add_argument("--phase", choices=("all", "time", "memory"), default="all",
                        help="run one half only, updating that half of the existing result file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ckpt-dir", type=Path, default=Path(tempfile.gettempdir()) / "loralab_qlora_bench")
    parser.add_argument("--worker", choices=TIME_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = worker(args.worker, args.shape, args.warmup, args.steps, args.checkpointing, args.ckpt)
        print(json.dumps(result))
        return

    results = RESULTS.with_name("qlora_step_quick.json") if args.quick else RESULTS
    # --phase time / memory update their half of an existing result file (the two phases can run at
    # different times on a shared machine); every worker result is saved as soon as it arrives.
    out: dict = json.loads(results.read_text()) if args.phase != "all" and results.exists() else {}
    out.update(quick=args.quick, threads=args.threads)

    def save() -> None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(out, indent=2))

    if args.phase in ("all", "time"):
        shape = "135m-quick" if args.quick else "135m"
        rounds, warmup, steps = (1, 1, 2) if args.quick else (args.rounds, 1, args.time_steps)
        ckpt = write_checkpoint(shape, args.ckpt_dir / shape)
        spec = SHAPES[shape]
        print(f"TIME {shape} (batch {spec['batch']} x {spec['seq']}), {rounds} interleaved rounds, "
              f"{warmup} warmup + {steps} timed steps")
        timing: dict[str, list[float]] = {v: [] for v in TIME_VARIANTS}
        out.update(time_shape=shape, time_rounds=rounds, time_warmup=warmup, time_steps=steps, runs_135m=[])
        per_round: list[dict[str, float]] = []
        for r in range(rounds):
            order = TIME_VARIANTS[r % len(TIME_VARIANTS):] + TIME_VARIANTS[: r % len(TIME_VARIANTS)]  # rotate
            per_round.append({})
            for variant in order:
                result = _run_worker(variant, shape, warmup, steps, False, ckpt, args.threads)
                timing[variant] += result["step_s"]
                per_round[-1][variant] = statistics.median(result["step_s"])
                out["runs_135m"].append(result)
                save()
        # Each ratio: the median over rounds of (median step of A / median step of B) within one round --
        # runs of a round are minutes apart at most, so a host that drifts over the run cancels out.
        out.update(median_step_s_135m={v: statistics.median(t) for v, t in timing.items()}, ratio_of="paired rounds")
        for a, b in (("qlora", "lora"), ("qlora", "peft_bnb"), ("qlora_torch", "lora"), ("qlora_torch", "peft_bnb"),
                     ("qlora", "qlora_torch")):
            out[f"{a}_over_{b}_time"] = statistics.median(x[a] / x[b] for x in per_round)
        save()
    if args.phase in ("all", "memory") and not args.quick:
        ckpt = write_checkpoint("1b", args.ckpt_dir / "1b")
        print(f"MEMORY 1B shape (batch 1 x 128, gradient checkpointing, {args.mem_steps} steps), "
              "one variant at a time")
        peak: dict[str, int] = {}
        out.update(mem_steps=args.mem_steps, runs_1b=[])
        for variant in VARIANTS:
            result = _run_worker(variant, "1b", 0, args.mem_steps, True, ckpt, args.threads)
            peak[variant] = result["peak_rss_bytes"]
            out["runs_1b"].append(result)
            out["peak_rss_bytes_1b"] = peak
            save()
        out.update(qlora_over_lora_peak_mem=peak["qlora"] / peak["lora"],
                   qlora_over_peft_bnb_peak_mem=peak["qlora"] / peak["peft_bnb"])
        save()
    for key in ("qlora_over_lora_time", "qlora_over_peft_bnb_time", "qlora_torch_over_lora_time",
                "qlora_torch_over_peft_bnb_time", "qlora_over_qlora_torch_time", "qlora_over_lora_peak_mem",
                "qlora_over_peft_bnb_peak_mem"):
        if key in out:
            print(f"{key}: {out[key]:.3f}")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
