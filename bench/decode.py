"""E2E decoding speed: loralab's decoder beside transformers' ``generate`` on the PEFT model, same settings.

SmolLM2-135M-Instruct (the zoo) with a trained LoRA adapter (r = 4 on q_proj and v_proj, the PEFT
format: ``--adapter DIR``, e.g. a run's ``adapter/``; without it one is trained first with the e2e-cpu
preset on 1,200 devset rows, about 10 minutes), the first ``--mrs`` unique MRs of the E2E test set, the
paper's decoding (beam 10, length penalty 0.9, no repeated 4-grams, at most 64 new tokens, batch 8).

Variants, each in the same process, interleaved round by round (the order rotates):

  peft_hf_fp32     -- transformers + PEFT as its users run it: the fp32 model, ``PeftModel.from_pretrained``,
                      ``model.generate`` on length-sorted, left-padded batches (loralab's batching, so both
                      see the same batches)
  loralab_fp32     -- ``generate_batched`` (merged fp32 copy + loralab's beam search)
  loralab_bf16     -- the same with the copy in bf16 (``generate.dtype=auto`` on this CPU)
  greedy_peft_hf / greedy_loralab_bf16 -- num_beams = 1, tokens/s

Reported: seconds per MR per round (median, min, max of ``--rounds``); the GEMM floor (the bf16 decode's
step matmuls alone, timed for the rows it actually stepped: no decoder of this model beats it on this
CPU) and loralab bf16's ratio to it; the floor of every matmul (those, the attention's q K^T and p V over
the keys each step needs, and the prompts' forward matmuls) and the ratio to that; the speed-up of loralab bf16 over
peft_hf_fp32 (median of within-round ratios), and how many MRs give the same string as peft_hf_fp32:
loralab_fp32 (the semantics check: expected all but float32 rounding ties) and loralab_bf16 (bf16 is not
expected to match every string); the differing MRs are listed. Targets (issue #15): loralab bf16
<= 0.4 s per MR, >= 3x peft_hf_fp32; loralab fp32 identical on >= 95% of MRs.

    python bench/decode.py --adapter RUN/adapter          # 3 rounds over 64 MRs: ~25 minutes on 2 cores
    python bench/decode.py --quick --adapter RUN/adapter  # 1 round, 8 MRs (a smoke run)
    python bench/decode.py --floor-only --adapter RUN/adapter  # loralab bf16 and the floor: ~5 minutes
Writes bench/results/decode.json (decode_quick.json with --quick, decode_floor.json with --floor-only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"s_per_mr_bf16": 0.4, "bf16_over_peft": 3.0, "fp32_identical_share": 0.95}
PAPER = dict(num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4, max_new_tokens=64, batch_size=8)


def _gen(**kw):
    from loralab.engine.schema import GenerateConfig

    return GenerateConfig(**{**PAPER, **kw})


def _train_adapter(out: Path) -> Path:
    cmd = [sys.executable, "-m", "loralab.cli", "train", "--preset", "e2e-cpu", "name=bench-decode-adapter",
           "model.compute_dtype=auto", "data.train_samples=1200", "data.eval_samples=2", "generate.num_beams=1",
           "generate.max_new_tokens=8", f"out_dir={out}"]
    print("training the adapter:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return sorted(out.glob("*/adapter"))[-1]


def _models(adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.core.adapter_io import load_adapter
    from loralab.models.zoo import load_model, load_tokenizer, resolve

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(resolve("smollm2-135m")),
                                                                          dtype=torch.float32), str(adapter)).eval()
    ours, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    load_adapter(ours, adapter)
    return peft, ours.eval(), tokenizer


def _decode(model, tokenizer, mrs, gen) -> tuple[list[str], float, int]:
    from transformers import GenerationConfig

    from loralab.tasks.common.generation import generate_batched, generation_kwargs
    from loralab.tasks.e2e.data import eos_id, prompt_ids
    from loralab.tasks.e2e.generate import clean_output

    eos = eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(**generation_kwargs(gen, eos, pad))
    start = time.perf_counter()
    rows = generate_batched(model, [prompt_ids(tokenizer, mr) for mr in mrs], config, pad, [eos], gen.batch_size,
                            backend=gen.backend, dtype=gen.dtype)
    seconds = time.perf_counter() - start
    return [clean_output(tokenizer.decode(r, skip_special_tokens=True)) for r in rows], seconds, sum(map(len, rows))


def _shapes(decode) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Run ``decode()`` with loralab's Llama stepper counted: (rows, keys attended) of every decoding step
    (the keys a step needs: prompt + generated so far + the new one) and (examples, width) of every prompt."""
    from loralab.tasks.common.llama_step import LlamaStepper

    real_step, real_prefill, steps, prompts = LlamaStepper.step, LlamaStepper.prefill, [], []

    def counted(self, tokens, mask):
        steps.append((len(tokens), self.prompt_pad.shape[1] + self.gen_len + 1))
        return real_step(self, tokens, mask)

    def counted_prefill(self, ids, mask, max_len):
        prompts.append(tuple(ids.shape))
        return real_prefill(self, ids, mask, max_len)

    LlamaStepper.step, LlamaStepper.prefill = counted, counted_prefill
    try:
        decode()
    finally:
        LlamaStepper.step, LlamaStepper.prefill = real_step, real_prefill
    return steps, prompts


def _best(run, repeats: int = 5) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return best


def _gemm_seconds(steps, rows: int, repeats: int = 5, head: bool = True) -> float:
    """The weight matmuls of one decoding step alone, for ``rows`` rows (per layer q|k|v, o, gate|up and
    down, then the head), best of ``repeats``: the arithmetic floor of that step on this CPU."""
    model = steps.model
    hidden, inner = model.config.hidden_size, model.config.intermediate_size
    dtype = model.lm_head.weight.dtype
    x, g = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, inner, dtype=dtype)

    def run():
        for i, layer in enumerate(model.model.layers):
            x @ steps.w_qkv[i].T, x @ layer.self_attn.o_proj.weight.T, x @ steps.w_gu[i].T
            g @ layer.mlp.down_proj.weight.T
        if head:
            x @ model.lm_head.weight.T
    return _best(run, repeats)


def _attention_seconds(steps, rows: int, keys: int) -> float:
    """The attention matmuls of one decoding step alone (q K^T and p V per layer, bf16, over exactly the
    ``keys`` positions the step needs, contiguous operands), best of 5."""
    H, Hkv, D, layers = steps.H, steps.Hkv, steps.D, len(steps.model.model.layers)
    dtype = steps.model.lm_head.weight.dtype
    q, p = torch.randn(rows, Hkv, H // Hkv, D, dtype=dtype), torch.randn(rows, Hkv, H // Hkv, keys, dtype=dtype)
    k, v = torch.randn(rows, Hkv, D, keys, dtype=dtype), torch.randn(rows, Hkv, keys, D, dtype=dtype)
    return layers * _best(lambda: (q @ k, p @ v))


def gemm_floor(ours, tokenizer, mrs, gen) -> dict:
    """Seconds per MR that the bf16 decode's matmuls alone take (what no decoder of this model beats on this
    CPU): the steps' weight matmuls for the rows it actually stepped, the attention matmuls over the keys
    each step needs, and the prompts' weight matmuls (the prompt forward's tokens, padding included)."""
    from loralab.core.merged_copy import merged_copy
    from loralab.tasks.common.llama_step import LlamaStepper

    shapes, prompts = _shapes(lambda: _decode(ours, tokenizer, mrs, gen))
    rows = [r for r, _ in shapes]
    steps = LlamaStepper(merged_copy(ours, torch.bfloat16))
    per_rows = {r: _gemm_seconds(steps, r) for r in sorted(set(rows))}
    step_seconds = sum(per_rows[r] for r in rows)
    attention = sum(_attention_seconds(steps, r, k) for r, k in shapes)
    prompt = sum(_gemm_seconds(steps, e * w, repeats=3, head=False) for e, w in prompts)
    n = len(mrs)
    return {"s_per_mr": step_seconds / n, "attention_s_per_mr": attention / n, "prompt_s_per_mr": prompt / n,
            "all_matmuls_s_per_mr": (step_seconds + attention + prompt) / n,
            "steps": len(rows), "mean_rows": statistics.mean(rows),
            "step_gemm_ms_at_80_rows": 1e3 * (per_rows.get(80) or _gemm_seconds(steps, 80))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="a trained r=4 q,v adapter dir (PEFT format)")
    parser.add_argument("--mrs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--floor-only", action="store_true",
                        help="loralab bf16 (beam and greedy) and the matmul floor only -> decode_floor.json")
    args = parser.parse_args()
    if args.quick:
        args.mrs, args.rounds = 8, 1
    torch.set_num_threads(int(os.environ.get("LORALAB_BENCH_THREADS", "2")))
    from loralab.tasks.e2e.data import DEFAULT_DATA_DIR, EVAL_FILE, eval_groups, load_rows

    adapter = args.adapter or _train_adapter(Path.home() / ".cache" / "loralab" / "bench-decode")
    mrs, _ = eval_groups(load_rows(DEFAULT_DATA_DIR / EVAL_FILE), args.mrs)
    peft, ours, tokenizer = _models(adapter)
    variants = {
        "peft_hf_fp32": (peft, _gen(backend="transformers")),
        "loralab_fp32": (ours, _gen(dtype="float32")),
        "loralab_bf16": (ours, _gen(dtype="bfloat16")),
        "greedy_peft_hf": (peft, _gen(backend="transformers", num_beams=1, no_repeat_ngram_size=0)),
        "greedy_loralab_bf16": (ours, _gen(dtype="bfloat16", num_beams=1, no_repeat_ngram_size=0)),
    }
    if args.floor_only:
        variants = {k: variants[k] for k in ("loralab_bf16", "greedy_loralab_bf16")}
    _decode(ours, tokenizer, mrs[:2], _gen(dtype="bfloat16", max_new_tokens=4))  # first-use costs, untimed
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, list[int]] = {k: [] for k in variants}
    outputs: dict[str, list[str]] = {}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, gen = variants[name]
            out, seconds, n_tokens = _decode(model, tokenizer, mrs, gen)
            times[name].append(seconds / len(mrs))
            tokens[name].append(n_tokens)
            outputs.setdefault(name, out)
            print(f"round {r}: {name:22s} {seconds / len(mrs):.3f} s/MR ({n_tokens} tokens)", flush=True)
    floor = gemm_floor(ours, tokenizer, mrs, variants["loralab_bf16"][1])
    print(f"floor: the step matmuls alone take {floor['s_per_mr']:.3f} s/MR, every matmul "
          f"{floor['all_matmuls_s_per_mr']:.3f} s/MR", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    if args.floor_only:
        result = {"machine": machine, "settings": {**PAPER, "mrs": len(mrs), "rounds": args.rounds, "adapter": str(adapter)},
                  "s_per_mr": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()},
                  "greedy_tokens_per_s": statistics.median(n / (t * len(mrs)) for n, t in
                                                           zip(tokens["greedy_loralab_bf16"], times["greedy_loralab_bf16"])),
                  "gemm_floor": floor,
                  "bf16_over_all_matmuls": statistics.median(times["loralab_bf16"]) / floor["all_matmuls_s_per_mr"]}
        out = ROOT / "bench" / "results" / ("decode_floor_quick.json" if args.quick else "decode_floor.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"wrote {out}")
        return
    ref = outputs["peft_hf_fp32"]

    def same(name: str) -> dict:
        diff = [i for i, (a, b) in enumerate(zip(ref, outputs[name])) if a != b]
        return {"identical": len(mrs) - len(diff), "of": len(mrs), "share": 1 - len(diff) / len(mrs),
                "differing": [{"mr": mrs[i], "peft_hf": ref[i], name: outputs[name][i]} for i in diff]}

    ratio = statistics.median(p / b for p, b in zip(times["peft_hf_fp32"], times["loralab_bf16"]))
    result = {
        "machine": machine,
        "settings": {**PAPER, "mrs": len(mrs), "rounds": args.rounds, "adapter": str(adapter)},
        "s_per_mr": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()},
        "greedy_tokens_per_s": {k: statistics.median(n / (t * len(mrs)) for n, t in zip(tokens[k], times[k]))
                                for k in ("greedy_peft_hf", "greedy_loralab_bf16")},
        "gemm_floor": floor,
        "bf16_over_gemm_floor": statistics.median(times["loralab_bf16"]) / floor["s_per_mr"],
        "bf16_over_all_matmuls": statistics.median(times["loralab_bf16"]) / floor["all_matmuls_s_per_mr"],
        "bf16_over_peft": ratio,
        "fp32_over_peft": statistics.median(p / b for p, b in zip(times["peft_hf_fp32"], times["loralab_fp32"])),
        "strings_vs_peft_hf": {"loralab_fp32": same("loralab_fp32"), "loralab_bf16": same("loralab_bf16")},
    }
    result["targets"] = {
        "s_per_mr_bf16": {"target": f"<= {TARGETS['s_per_mr_bf16']}", "value": result["s_per_mr"]["loralab_bf16"]["median"],
                          "met": result["s_per_mr"]["loralab_bf16"]["median"] <= TARGETS["s_per_mr_bf16"]},
        "bf16_over_peft": {"target": f">= {TARGETS['bf16_over_peft']}", "value": ratio, "met": ratio >= TARGETS["bf16_over_peft"]},
        "fp32_identical_share": {"target": f">= {TARGETS['fp32_identical_share']}",
                                 "value": result["strings_vs_peft_hf"]["loralab_fp32"]["share"],
                                 "met": result["strings_vs_peft_hf"]["loralab_fp32"]["share"] >= TARGETS["fp32_identical_share"]},
    }
    out = ROOT / "bench" / "results" / ("decode_quick.json" if args.quick else "decode.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("s_per_mr", "greedy_tokens_per_s", "gemm_floor", "bf16_over_gemm_floor",
                                            "bf16_over_peft", "targets")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
