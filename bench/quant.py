"""NF4 quantize / dequantize throughput: loralab.core.quant vs bitsandbytes (CPU backend).

Workload: a 4096 x 4096 weight (fp32 and bf16; ``--quick``: 2048 x 2048), NF4, block 64, double quant
(QLoRA's setting). Each round times bnb and loralab back to back, alternating which goes first, so
both see the same load on this shared machine; ratio = median over rounds of bnb_time / loralab_time
(> 1: loralab faster). Before timing, the outputs are checked bit-identical (packed bytes, absmax,
nested state, dequantized weight) so the two sides do the same work.

Dequantize is also timed with loralab's huge-page output hint switched off (``*_no_hugepages``): a
fresh 4096 x 4096 fp32 result is a new 64 MiB mapping, and faulting in its 4 KiB pages costs more than
the decoding on this VM; bnb allocates its result the ordinary way, so both numbers are reported.

Dequantize runs loralab's native kernel (loralab.core.native) when it builds, as users get by default;
``*_pure_torch`` times the torch-only decode (LORALAB_NATIVE=0). ``dequantize_speed_vs_bnb_135m_shapes``
times what a QLoRA step does: the seven linear shapes of a 135M Llama (576 wide, 1536 MLP, 3 KV heads of
64), decoded into a reused fp32 buffer, 50 calls per shape per round.

Also reports storage bits per parameter (packed codes + scales, from the real tensor sizes) with and
without double quantization. Writes bench/results/quant.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from loralab.core import native
from loralab.core import dequant as D
from loralab.core import quant as Q
from loralab.core import quant_state as S

RESULTS = Path(__file__).resolve().parent / "results" / "quant.json"


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """One warm-up call each (allocator, caches), then ``rounds`` rounds of one timed call each, the order
    reversed every other round so both sides see the same load."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[name].append(_time(fns[name]))
    return times


def _bnb_bits(packed: torch.Tensor, state) -> float:
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        nbytes += state.state2.absmax.numel() * 4 + 4
    return 8.0 * nbytes / state.shape.numel()


def _without_huge_pages(fn, *args):
    """Run with the huge-page output hint off: what the decoding itself costs next to bnb."""
    D.HUGE_PAGE_OUTPUT = False
    try:
        return fn(*args)
    finally:
        D.HUGE_PAGE_OUTPUT = True


def _pure_torch(fn, *args):
    with native.disabled():
        return fn(*args)


def bench_135m_shapes(rounds: int, calls: int = 50) -> dict:
    """Decode into a reused buffer (as Linear4bit does in training) at a 135M Llama's linear shapes."""
    import bitsandbytes.functional as F

    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    cases = []
    for i, shape in enumerate(shapes):
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        ref_packed, ref_state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        packed, state = Q.quantize_4bit(weight, "nf4", 64, double_quant=True)
        buf = torch.empty(shape)
        assert torch.equal(D.dequantize_4bit(packed, state, out=buf), F.dequantize_4bit(ref_packed, ref_state))
        cases.append((ref_packed, ref_state, packed, state, buf))

    def run(kind: str) -> None:
        for ref_packed, ref_state, packed, state, buf in cases:
            for _ in range(calls):
                if kind == "bnb":
                    F.dequantize_4bit(ref_packed, ref_state)
                else:
                    D.dequantize_4bit(packed, state, out=buf)

    fns = {"bnb": lambda: run("bnb"), "loralab": lambda: run("loralab"),
           "loralab_pure_torch": lambda: _pure_torch(run, "loralab")}
    times = _interleaved(fns, rounds)
    per_call = len(shapes) * calls
    return {"per_call_us": {k: statistics.median(v) / per_call * 1e6 for k, v in times.items()},
            "median_ratio_bnb_over_loralab": statistics.median(b / l for b, l in zip(times["bnb"], times["loralab"])),
            "median_ratio_bnb_over_loralab_pure_torch": statistics.median(
                b / l for b, l in zip(times["bnb"], times["loralab_pure_torch"]))}


def bench_dtype(dtype: torch.dtype, size: int, rounds: int) -> dict:
    import bitsandbytes.functional as F

    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref_packed, ref_state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = Q.quantize_4bit(weight, "nf4", 64, double_quant=True)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(state.nested_absmax, ref_state.state2.absmax) and torch.equal(state.offset, ref_state.offset)
    assert torch.equal(D.dequantize_4bit(packed, state), F.dequantize_4bit(ref_packed, ref_state))

    quant = {"bnb": lambda: F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True),
             "loralab": lambda: Q.quantize_4bit(weight, "nf4", 64, double_quant=True)}
    dequant = {"bnb": lambda: F.dequantize_4bit(ref_packed, ref_state),
               "loralab": lambda: D.dequantize_4bit(packed, state),
               "loralab_no_hugepages": lambda: _without_huge_pages(D.dequantize_4bit, packed, state),
               "loralab_pure_torch": lambda: _pure_torch(D.dequantize_4bit, packed, state)}
    out = {}
    for op, fns in (("quantize", quant), ("dequantize", dequant)):
        times = _interleaved(fns, rounds)
        out[op] = {"bnb_median_s": statistics.median(times["bnb"])}
        for name in fns:
            if name != "bnb":
                ratios = [b / l for b, l in zip(times["bnb"], times[name])]
                suffix = name.removeprefix("loralab")
                out[op].update({f"loralab{suffix}_median_s": statistics.median(times[name]),
                                f"median_ratio_bnb_over_loralab{suffix}": statistics.median(ratios),
                                f"ratios{suffix}": [round(x, 3) for x in ratios]})
    out["bits_per_param_dq"] = S.bits_per_param(packed, state)
    out["bnb_bits_per_param_dq"] = _bnb_bits(ref_packed, ref_state)
    plain_packed, plain_state = Q.quantize_4bit(weight, "nf4", 64, double_quant=False)
    out["bits_per_param"] = S.bits_per_param(plain_packed, plain_state)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2048x2048, 3 rounds (< 1 minute)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    size = 2048 if args.quick else 4096
    rounds = args.rounds or (3 if args.quick else 7)
    load_at_start = os.getloadavg()
    results = {dtype_name: bench_dtype(dtype, size, rounds)
               for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    fp32 = results["float32"]
    small = bench_135m_shapes(rounds)
    summary = {
        "bits_per_param": round(fp32["bits_per_param"], 4),
        "bits_per_param_dq": round(fp32["bits_per_param_dq"], 4),
        "quantize_speed_vs_bnb": round(fp32["quantize"]["median_ratio_bnb_over_loralab"], 3),
        "dequantize_speed_vs_bnb": round(fp32["dequantize"]["median_ratio_bnb_over_loralab"], 3),
        "dequantize_speed_vs_bnb_pure_torch": round(fp32["dequantize"]["median_ratio_bnb_over_loralab_pure_torch"], 3),
        "dequantize_speed_vs_bnb_135m_shapes": round(small["median_ratio_bnb_over_loralab"], 3),
        "dequantize_speed_vs_bnb_135m_shapes_pure_torch": round(small["median_ratio_bnb_over_loralab_pure_torch"], 3),
        "dequantize_us_per_call_135m_shapes": {k: round(v, 1) for k, v in small["per_call_us"].items()},
        "native_decode": native.status(),
        "quantize_speed_vs_bnb_bf16": round(results["bfloat16"]["quantize"]["median_ratio_bnb_over_loralab"], 3),
        "dequantize_speed_vs_bnb_bf16": round(results["bfloat16"]["dequantize"]["median_ratio_bnb_over_loralab"], 3),
        "dequantize_speed_vs_bnb_no_hugepages": round(
            fp32["dequantize"]["median_ratio_bnb_over_loralab_no_hugepages"], 3),
        "dequantize_speed_vs_bnb_bf16_no_hugepages": round(
            results["bfloat16"]["dequantize"]["median_ratio_bnb_over_loralab_no_hugepages"], 3),
        "note": "ratio = median over interleaved rounds of bnb_time / loralab_time; > 1 means loralab is faster. "
                "*_no_hugepages: loralab with its MADV_HUGEPAGE output hint off (bnb never uses one); most of "
                "a fresh 64 MiB output's cost on this VM is 4 KiB page faults, which the hint cuts ~4x",
        "workload": f"{size}x{size} NF4, block 64, double quant; bit-identical outputs checked before timing",
        "quick": args.quick, "rounds": rounds, "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_at_start": load_at_start,
        "load_avg_at_end": os.getloadavg(), "huge_page_hint": D.HUGE_PAGE_OUTPUT,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "details": dict(results, shapes_135m=small),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "details"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
