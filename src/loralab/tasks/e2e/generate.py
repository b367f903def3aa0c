"""Decoding E2E outputs: one per unique MR (batched, left-padded, length-sorted: ``common.generation``).

Settings come from the run config's ``generate`` section (paper: beam 10, length penalty 0.9,
no-repeat 4-grams, at most 64 new tokens, stop at EOS), with transformers' beam-search semantics
(``common.generation``: a merged copy and loralab's beam search by default). An output is the text of
the new tokens before the first EOS, on one line.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from torch import nn

from loralab.tasks.common.generation import decode_options, generate_batched, generation_kwargs
from loralab.tasks.e2e.data import eos_id, prompt_ids

PAPER_ROW = {"BLEU": 70.4, "NIST": 8.85, "METEOR": 46.8, "ROUGE_L": 71.8, "CIDEr": 2.53}
"""GPT-2 M + LoRA on E2E (Hu et al. 2021, Table 3); BLEU, METEOR, ROUGE-L in percent."""
PERCENT = ("BLEU", "METEOR", "ROUGE_L")


def clean_output(text: str) -> str:
    """One line: the official format has one output per line."""
    return re.sub(r"\s+", " ", text).strip()


def generate_outputs(model: nn.Module, tokenizer: Any, mrs: Sequence[str], gen: Any) -> list[str]:
    """One decoded output per MR, in ``mrs`` order."""
    from transformers import GenerationConfig

    eos = eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(**generation_kwargs(gen, eos, pad))
    rows = generate_batched(model, [prompt_ids(tokenizer, mr) for mr in mrs], config, pad, [eos], gen.batch_size,
                           **decode_options(gen))
    return [clean_output(tokenizer.decode(row, skip_special_tokens=True)) for row in rows]


def write_official(path: Any, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))


def write_references(path: Any, refs: Sequence[Sequence[str]]) -> None:
    """The official multi-reference format: one reference per line, MR groups split by a blank line."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join("\n".join(clean_output(r) for r in group) + "\n" for group in refs))


def results_table(scores: dict[str, float | None], label: str, baseline: dict[str, float | None] | None = None) -> str:
    """Markdown table of this run beside the paper's row and the un-adapted model's (BLEU, METEOR,
    ROUGE-L as percentages)."""
    def shown(key: str, value: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{100 * value:.1f}" if key in PERCENT else f"{value:.2f}"

    head = "| | BLEU | NIST | METEOR | ROUGE-L | CIDEr |\n|---|---|---|---|---|---|"
    paper = "| paper: GPT-2 M LoRA (Hu et al. 2021) | " + " | ".join(
        f"{PAPER_ROW[k]:.1f}" if k in PERCENT else f"{PAPER_ROW[k]:.2f}" for k in PAPER_ROW) + " |"
    rows = [head, paper]
    if baseline:
        rows.append("| baseline: the un-adapted model | " + " | ".join(shown(k, baseline.get(k)) for k in PAPER_ROW)
                    + " |")
    rows.append(f"| {label} | " + " | ".join(shown(k, scores.get(k)) for k in PAPER_ROW) + " |")
    return "\n".join(rows)
