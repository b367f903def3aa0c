"""LoRA layer overhead: loralab vs the frozen-base floor and vs PEFT, training and inference, CPU fp32.

Models (random init, fed ``inputs_embeds`` so the vocabulary does not matter):
  encoder -- BertModel, MiniLM size: 6 layers, hidden 384, 12 heads, FFN 1536; batch 32 x 128
             (--quick: 8 x 64). LoRA r=8 on query and value.
  decoder -- GPT2Model, GPT-2 small size: 12 layers, 768, 12 heads; batch 4 x 128 (--quick: 2 x 64).
             loralab: r=8 per slice on q and v of the fused c_attn (fused_qkv [True, False, True]);
             PEFT cannot slice a fused projection, so PEFT adapts the whole c_attn (r=8, fan_in_fan_out):
             a slightly different update with the same matmul shapes on the A side.
Variants, all in the same process. floor, lora_*, base, unmerged and merged use ONE model instance: adapters
disabled, active, or merged in place (merge and unmerge are not timed), so they share weights and memory
and differ only by the LoRA branch:
  floor      adapters disabled, forward + backward with inputs_embeds.requires_grad: the gradient flows
             through every activation, as LoRA training needs, and nothing else is computed.
  lora_p0/p01  loralab adapter (dropout 0 / 0.1), forward + backward (grads of A, B).
  peft_p0/p01  PEFT 0.21 LoraModel with the same rank/targets, forward + backward.
  base / unmerged / merged  inference (no_grad, eval mode): adapters disabled, adapter p0 unmerged, p0
             merged; one forward pass per call, timed after all training rounds.
  floor_copy / base_copy  the floor and base computations on a separate, untouched copy of the base
             model: controls. Their ratios to floor / base (``control_*``) differ from 1 only by noise and
             memory placement, and say how far any other ratio can be trusted.
Every ratio a/b is measured on its own calls made back to back, a b b a (or b a a b, alternating by round;
the pairs of a round in rotating order), as (a1 + a2) / (b1 + b2): 5 rounds of the training pairs (--quick:
2), then 10 of the inference pairs, so slow drifts of a shared machine's speed and any penalty for running
first cancel inside each round.
Ratios are medians over rounds of the paired ratios, for wall time (the headline keys) and for process CPU
time (``cpu_time``: less sensitive to other jobs on a shared machine); ``paired_wall_ratios`` keeps every
round's ratio, so the spread behind a median can be read. OMP_WAIT_POLICY defaults to PASSIVE
here so that, on an oversubscribed machine, idle OpenMP threads sleep instead of spinning.
Writes bench/results/lora_overhead.json (--quick: lora_overhead_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import

import torch  # noqa: E402

from loralab.core.config import LoraConfig  # noqa: E402
from loralab.core.inject import disable_adapters, inject_adapter, merge_adapters, set_adapter, unmerge_adapters

RESULTS = Path(__file__).resolve().parent / "results" / "lora_overhead.json"


def build(kind: str):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    if kind == "encoder":
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                         vocab_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertModel(cfg, add_pooling_layer=False)
        ours = dict(target_modules=["query", "value"])
        peft = dict(target_modules=["query", "value"])
    else:
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=128, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0)
        model = GPT2Model(cfg)
        ours = dict(fused_qkv={"c_attn": [True, False, True]})
        peft = dict(target_modules=["c_attn"], fan_in_fan_out=True)
    model.requires_grad_(False)
    return model, ours, peft, cfg.hidden_size if kind == "encoder" else cfg.n_embd


def variants(kind: str, batch: int, seq: int) -> dict:
    """name -> (setup, timed body, teardown). Floor, base, unmerged and merged all run on ONE model instance
    (``ours``: adapters disabled / active / merged in place), so the ratios compare the same weights in the
    same memory and differ only by the LoRA branch; ``*_copy`` run the same base computation on a
    separate, untouched copy of the base model -- a control whose ratio shows the noise of the machine."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    base_copy, ours_kw, peft_kw, width = build(kind)
    ours = copy.deepcopy(base_copy)
    for p in (0.0, 0.1):
        inject_adapter(ours, LoraConfig(r=8, lora_alpha=16, lora_dropout=p, **ours_kw), f"p{int(p * 10)}")
    for layer in ours.modules():  # non-zero B: a trained adapter (B = 0 would make merging a no-op)
        if hasattr(layer, "lora_B"):
            for lin in layer.lora_B.values():
                torch.nn.init.normal_(lin.weight, std=0.02)
    peft = get_peft_model(copy.deepcopy(base_copy), PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0, **peft_kw),
                          "p0")
    peft.add_adapter("p1", PeftConfig(r=8, lora_alpha=16, lora_dropout=0.1, **peft_kw))
    x = torch.randn(batch, seq, width)
    x_grad = x.clone().requires_grad_(True)

    def floor(model):
        def run():
            model(inputs_embeds=x_grad).last_hidden_state.mean().backward()
            x_grad.grad = None
        return run

    def step(model, activate, adapter):
        def run():
            activate(model, adapter)
            model(inputs_embeds=x).last_hidden_state.mean().backward()
            for p in model.parameters():
                p.grad = None
        return run

    def infer(model):
        def run():
            with torch.no_grad():
                model(inputs_embeds=x)
        return run

    def peft_activate(m, name):
        m.base_model.set_adapter(name)

    return {
        "floor": (lambda: (ours.train(), _enter(ours)), floor(ours), _exit),
        "floor_copy": (base_copy.train, floor(base_copy), None),
        "lora_p0": (ours.train, step(ours, set_adapter, "p0"), None),
        "lora_p01": (ours.train, step(ours, set_adapter, "p1"), None),
        "peft_p0": (peft.train, step(peft, peft_activate, "p0"), None),
        "peft_p01": (peft.train, step(peft, peft_activate, "p1"), None),
        "base": (lambda: (ours.eval(), _enter(ours)), infer(ours), _exit),
        "base_copy": (base_copy.eval, infer(base_copy), None),
        "unmerged": (lambda: (ours.eval(), set_adapter(ours, "p0")), infer(ours), None),
        "merged": (lambda: (ours.eval(), set_adapter(ours, "p0"), merge_adapters(ours)), infer(ours),
                   lambda: unmerge_adapters(ours)),
    }


_OPEN: list = []  # the disable_adapters context entered by a setup, closed by its teardown


def _enter(model) -> None:
    ctx = disable_adapters(model)
    ctx.__enter__()
    _OPEN.append(ctx)


def _exit() -> None:
    _OPEN.pop().__exit__(None, None, None)


def timed(setup, fn, teardown) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn``; setup and teardown are not timed."""
    if setup:
        setup()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if teardown:
        teardown()
    return dt, dc


def run(kind: str, batch: int, seq: int, rounds: int) -> dict:
    """Each ratio from its own back-to-back calls A B B A (or B A A B, alternating by round; pairs rotating):
    ratio = (A1 + A2) / (B1 + B2), so a linear drift and a first-or-second position penalty both cancel
    (with plain A B pairs in alternating order, a position effect split the ratios into two groups and
    the median of an odd count picked one of them: 1.14 for a pair whose medians differed by 0.5%)."""
    fns = variants(kind, batch, seq)
    wall: dict[str, list[float]] = {n: [] for n in fns}
    cpu: dict[str, list[float]] = {n: [] for n in fns}
    pair_wall: dict[str, list[float]] = {k: [] for k in RATIOS}
    pair_cpu: dict[str, list[float]] = {k: [] for k in RATIOS}

    def measure(keys: list[str], n_rounds: int) -> None:
        for name in dict.fromkeys(n for k in keys for n in RATIOS[k]):  # warmup
            timed(*fns[name])
        for i in range(n_rounds):
            for key in keys[i % len(keys):] + keys[:i % len(keys)]:
                a, b = RATIOS[key]
                t = {a: [0.0, 0.0], b: [0.0, 0.0]}
                for name in ((a, b, b, a) if i % 2 == 0 else (b, a, a, b)):  # ABBA: drift and position cancel
                    dt, dc = timed(*fns[name])
                    t[name][0] += dt
                    t[name][1] += dc
                    wall[name].append(dt)
                    cpu[name].append(dc)
                pair_wall[key].append(t[a][0] / t[b][0])
                pair_cpu[key].append(t[a][1] / t[b][1])

    measure([k for k, (a, _) in RATIOS.items() if a not in INFERENCE], rounds)
    # inference apart from training, one forward pass per call
    measure([k for k, (a, _) in RATIOS.items() if a in INFERENCE], rounds * INFER_REPS)

    def medians(samples: dict[str, list[float]]) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in samples.items()}

    return {"batch": batch, "seq": seq, "rounds": rounds, **medians(pair_wall), "cpu_time": medians(pair_cpu),
            "median_wall_s": medians(wall), "median_cpu_s": medians(cpu),
            "paired_wall_ratios": pair_wall}  # every round's ratio: the spread behind each median


INFERENCE = ("base", "base_copy", "unmerged", "merged")
INFER_REPS = 2  # rounds of the inference pairs per training round

RATIOS = {
    "lora_p0_over_floor": ("lora_p0", "floor"), "lora_p01_over_floor": ("lora_p01", "floor"),
    "lora_over_peft_p0": ("lora_p0", "peft_p0"), "lora_over_peft_p01": ("lora_p01", "peft_p01"),
    "peft_p0_over_floor": ("peft_p0", "floor"), "peft_p01_over_floor": ("peft_p01", "floor"),
    "unmerged_over_base": ("unmerged", "base"), "merged_over_base": ("merged", "base"),
    # controls: the same base computation on a separate copy of the model (1 up to machine noise)
    "control_floor_copy_over_floor": ("floor_copy", "floor"), "control_base_copy_over_base": ("base_copy", "base"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batches, 2 rounds (< 1 minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = {"encoder": (8, 64), "decoder": (2, 64)} if args.quick else {"encoder": (32, 128), "decoder": (4, 128)}
    rounds = args.rounds or (2 if args.quick else 5)
    results = {"threads": args.threads, "quick": args.quick, "inference_rounds": rounds * INFER_REPS,
               "torch": torch.__version__,
               "machine": f"{platform.machine()} {platform.processor()}".strip()}
    for kind, (batch, seq) in shapes.items():
        results[kind] = run(kind, batch, seq, rounds)
    enc, dec = results["encoder"], results["decoder"]
    print(f"{'median ratio':<30}{'enc wall':>10}{'enc cpu':>10}{'dec wall':>10}{'dec cpu':>10}")
    for k in RATIOS:
        print(f"{k:<30}{enc[k]:>10.3f}{enc['cpu_time'][k]:>10.3f}{dec[k]:>10.3f}{dec['cpu_time'][k]:>10.3f}")
    for kind in shapes:
        print(kind, "median wall s", {n: round(t, 3) for n, t in results[kind]["median_wall_s"].items()})
    out = RESULTS.with_name("lora_overhead_quick.json") if args.quick else RESULTS  # a smoke run never
    out.parent.mkdir(parents=True, exist_ok=True)                                   # overwrites the result
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
