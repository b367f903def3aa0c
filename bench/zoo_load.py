"""SmolLM2-135M load time: the zoo's converted safetensors directory vs transformers' GGUF loader.

Both produce the same float32 LlamaForCausalLM (tests/models/test_zoo.py checks the logits match).
Variants, alternated within each round so each pair sees the same machine load:
  zoo   zoo.load_model("smollm2-135m") + load_tokenizer: reads <cache>/models/smollm2-135m
  gguf  transformers from_pretrained(..., gguf_file=...) for model and tokenizer: parses + dequantizes
Also times the one-time conversion into a fresh temporary cache (--convert).
Ratio = median over rounds of gguf / zoo. Writes bench/results/zoo_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loralab.models import zoo
from loralab.models.gguf_convert import convert_gguf

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_load.json"


def load_zoo() -> None:
    zoo.load_model("smollm2-135m", "causal_lm")
    zoo.load_tokenizer("smollm2-135m")


def load_gguf(src: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--convert", action="store_true", help="also time a fresh conversion")
    args = parser.parse_args()
    src = Path({m.name: m for m in zoo.list_models()}["smollm2-135m"].source)
    zoo.resolve("smollm2-135m")  # make sure the cache exists before timing loads
    load_zoo()  # warm imports and the page cache for both variants
    load_gguf(src)
    rounds = []
    for r in range(args.rounds):
        order = [("zoo", load_zoo, ()), ("gguf", load_gguf, (src,))]
        times = {name: timed(fn, *a) for name, fn, a in (order if r % 2 == 0 else order[::-1])}
        rounds.append(times)
        print(f"round {r}: zoo {times['zoo']:.2f} s, gguf {times['gguf']:.2f} s", file=sys.stderr)
    result = {
        "zoo_s_median": statistics.median(t["zoo"] for t in rounds),
        "gguf_s_median": statistics.median(t["gguf"] for t in rounds),
        "gguf_over_zoo_median": statistics.median(t["gguf"] / t["zoo"] for t in rounds),
        "rounds": rounds, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "torch": torch.__version__,
    }
    if args.convert:
        with tempfile.TemporaryDirectory() as tmp:
            result["convert_s"] = timed(convert_gguf, src, Path(tmp) / "smollm2-135m", lambda m: None)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
