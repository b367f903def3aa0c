"""LoRA layer overhead: loralab vs the frozen-base floor and vs PEFT, training and inference, CPU fp32.

Models (random init, fed ``inputs_embeds`` so the vocabulary does not matter):
  encoder -- BertModel, MiniLM size: 6 layers, hidden 384, 12 heads, FFN 1536; batch 32 x 128
             (--quick: 8 x 64). LoRA r=8 on query and value.
  decoder -- GPT2Model, GPT-2 small size: 12 layers, 768, 12 heads; batch 4 x 128 (--quick: 2 x 64).
             loralab: r=8 per slice on q and v of the fused c_attn (fused_qkv [True, False, True]);
             PEFT cannot slice a fused projection, so PEFT adapts the whole c_attn (r=8, fan_in_fan_out):
             a slightly different update with the same matmul shapes on the A side.
Variants (all in the same process, each run once per round in rotating order, so every round pairs them
under the same machine load):
  floor      frozen base, forward + backward with inputs_embeds.requires_grad: the gradient flows
             through every activation, as LoRA training needs, and nothing else is computed.
  lora_p0/p01  loralab adapter (dropout 0 / 0.1), forward + backward (grads of A, B).
  peft_p0/p01  PEFT 0.21 LoraModel with the same rank/targets, forward + backward.
  base / unmerged / merged  inference (no_grad) of the base, loralab unmerged, loralab merged.
Ratios are medians over rounds of per-round ratios, for wall time (the headline keys) and for process CPU
time (``cpu_time``: less sensitive to other jobs on a shared machine). OMP_WAIT_POLICY defaults to PASSIVE
here so that, on an oversubscribed machine, idle OpenMP threads sleep instead of spinning.
Writes bench/results/lora_overhead.json.
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
from loralab.core.inject import inject_adapter, merge_adapters, set_adapter, unmerge_adapters

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
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    base, ours_kw, peft_kw, width = build(kind)
    ours = copy.deepcopy(base)
    for p in (0.0, 0.1):
        inject_adapter(ours, LoraConfig(r=8, lora_alpha=16, lora_dropout=p, **ours_kw), f"p{int(p * 10)}")
    peft = get_peft_model(copy.deepcopy(base), PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0, **peft_kw), "p0")
    peft.add_adapter("p1", PeftConfig(r=8, lora_alpha=16, lora_dropout=0.1, **peft_kw))
    for m in (base, ours, peft):
        m.train()
    x = torch.randn(batch, seq, width)
    x_grad = x.clone().requires_grad_(True)

    def floor():
        base(inputs_embeds=x_grad).last_hidden_state.mean().backward()
        x_grad.grad = None

    def step(model, activate, adapter):
        def run():
            activate(model, adapter)
            model(inputs_embeds=x).last_hidden_state.mean().backward()
            for p in model.parameters():
                p.grad = None
        return run

    def infer(model, before=None, after=None):
        def run():
            if before:
                before(model)
            model.eval()
            with torch.no_grad():
                model(inputs_embeds=x)
            model.train()
            if after:
                after(model)
        return run

    def peft_activate(m, name):
        m.base_model.set_adapter(name)

    return {
        "floor": floor,
        "lora_p0": step(ours, set_adapter, "p0"),
        "lora_p01": step(ours, set_adapter, "p1"),
        "peft_p0": step(peft, peft_activate, "p0"),
        "peft_p01": step(peft, peft_activate, "p1"),
        "base": infer(base),
        "unmerged": infer(ours),
        # merge/unmerge happen outside the timed region (see timed())
        "merged": infer(ours),
    }, ours


def timed(fn, setup=None, teardown=None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; setup/teardown are not timed."""
    if setup:
        setup()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if teardown:
        teardown()
    return dt, dc


def run(kind: str, batch: int, seq: int, rounds: int) -> dict:
    fns, ours = variants(kind, batch, seq)
    names = list(fns)
    hooks = {"merged": (lambda: (set_adapter(ours, "p0"), merge_adapters(ours)), lambda: unmerge_adapters(ours)),
             "unmerged": (lambda: set_adapter(ours, "p0"), None)}
    for name in names:  # warmup
        timed(fns[name], *hooks.get(name, (None, None)))
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            dt, dc = timed(fns[name], *hooks.get(name, (None, None)))
            wall[name].append(dt)
            cpu[name].append(dc)

    def ratios(times):
        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        return {k: ratio(a, b) for k, (a, b) in RATIOS.items()}

    return {"batch": batch, "seq": seq, "rounds": rounds, **ratios(wall), "cpu_time": ratios(cpu),
            "median_wall_s": {n: statistics.median(t) for n, t in wall.items()},
            "median_cpu_s": {n: statistics.median(t) for n, t in cpu.items()}}


RATIOS = {
    "lora_p0_over_floor": ("lora_p0", "floor"), "lora_p01_over_floor": ("lora_p01", "floor"),
    "lora_over_peft_p0": ("lora_p0", "peft_p0"), "lora_over_peft_p01": ("lora_p01", "peft_p01"),
    "peft_p0_over_floor": ("peft_p0", "floor"), "peft_p01_over_floor": ("peft_p01", "floor"),
    "unmerged_over_base": ("unmerged", "base"), "merged_over_base": ("merged", "base"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batches, 3 rounds (< 1 minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = {"encoder": (8, 64), "decoder": (2, 64)} if args.quick else {"encoder": (32, 128), "decoder": (4, 128)}
    rounds = args.rounds or (3 if args.quick else 7)
    results = {"threads": args.threads, "quick": args.quick, "torch": torch.__version__,
               "machine": f"{platform.machine()} {platform.processor()}".strip()}
    for kind, (batch, seq) in shapes.items():
        results[kind] = run(kind, batch, seq, rounds)
    enc, dec = results["encoder"], results["decoder"]
    print(f"{'median ratio':<22}{'enc wall':>10}{'enc cpu':>10}{'dec wall':>10}{'dec cpu':>10}")
    for k in RATIOS:
        print(f"{k:<22}{enc[k]:>10.3f}{enc['cpu_time'][k]:>10.3f}{dec[k]:>10.3f}{dec['cpu_time'][k]:>10.3f}")
    for kind in shapes:
        print(kind, "median wall s", {n: round(t, 3) for n, t in results[kind]["median_wall_s"].items()})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
