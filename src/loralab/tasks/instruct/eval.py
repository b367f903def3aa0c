"""Evaluation of an instruction-tuned adapter that first proves the adapter is there.

The study we reproduce scored the untrained base model by mistake. ``assert_adapter_present``
makes that impossible to do silently: every active LoRA layer must have a non-zero ``lora_B``
(B starts at 0, so an untrained or unloaded adapter computes exactly the base model) and switching
the adapters off must change the logits of a real batch. Only then do we score:

* held-out loss / perplexity on assistant tokens: ``loss = sum(-log p(y_t | y_<t)) / n_tokens``,
  ``ppl = exp(loss)`` (the base model's is the experiment's baseline, measured before training);
* GSM8K exact match: the reference is the number after "####"; from the model's text we take the
  first number after its last "####" if it wrote one, else its last number. Numbers are compared
  as decimals after dropping "$", thousands commas and trailing zeros ("$1,000.00" == "1000");
* side-by-side generations, base vs fine-tuned, for a prompt list (greedy, chat template with the
  generation prompt, batched with left padding).

Each scoring call takes ``progress=True`` for a tqdm bar on stderr (held-out batches; decoding steps,
counted as ``batches x max_new_tokens``, the most it can take, so the bar may end early at end of turn).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

import torch
from torch import nn

from loralab.core.linear4bit import cached_dequantize
from loralab.engine.progress import progress_bar
from loralab.tasks.common.causal_lm import forward_logits, heldout_loss
from loralab.tasks.common.generation import decode_options, generate_batched, generation_kwargs
from loralab.tasks.instruct.data import Conversation, end_of_turn_ids, render_ids, resolve_chat_template

STUDY_PROMPTS = ["What is a cat?", "What is 9+3?", "What is the secret word?",
                 "Please reverse the words in the sentence \"I'm a cool dude in a mocha mood.\""]


class AdapterNotPresentError(RuntimeError):
    """The model about to be scored as "fine-tuned" would compute the base model's outputs."""


# ----------------------------------------------------------------------------- the guard


def _lora_b_is_zero(layer: nn.Module, adapter: str) -> bool:
    return all(not bool(p.detach().ne(0).any()) for p in layer.lora_B[adapter].parameters())


@torch.no_grad()
def assert_adapter_present(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Raise ``AdapterNotPresentError`` unless the active adapter is non-zero and changes the logits.

    Returns {"lora_layers": number of active (layer, adapter) pairs, "max_logit_change": max |on - off|}.
    """
    from loralab.core.inject import disable_adapters, lora_modules

    layers = list(lora_modules(model))
    if not layers:
        raise AdapterNotPresentError("the model has no LoRA layers: the adapter was never injected or loaded "
                                     "(call load_adapter/inject_adapter before evaluating)")
    active = [(name, layer, a) for name, layer in layers for a in layer.active_adapters]
    if not active:
        raise AdapterNotPresentError("the model has LoRA layers but no active adapter (set_adapter first)")
    disabled = [name for name, layer in layers if layer.adapters_disabled]
    if disabled:
        raise AdapterNotPresentError(f"adapters are disabled in {len(disabled)} layers (e.g. {disabled[0]}); "
                                     "evaluate outside `disable_adapters(model)`")
    zero = [f"{name}.lora_B.{a}" for name, layer, a in active if _lora_b_is_zero(layer, a)]
    if zero:
        raise AdapterNotPresentError(
            f"{len(zero)} of {len(active)} active LoRA layers have an all-zero lora_B (e.g. {zero[:3]}): such a "
            "layer computes exactly the base model. The adapter is untrained or its weights did not load; "
            "check the adapter dir and that training updated it")
    was_training = model.training
    model.eval()  # LoRA dropout off: the comparison must be deterministic
    try:
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        on = forward_logits(model, batch).float()
        with disable_adapters(model):
            off = forward_logits(model, batch).float()
    finally:
        model.train(was_training)
    change = float((on - off).abs().max())
    if not change > 0.0:
        raise AdapterNotPresentError("switching the adapters off does not change the logits: the scored model "
                                     "would be the base model. Is the adapter attached to layers the forward uses?")
    return {"lora_layers": float(len(active)), "max_logit_change": change}


# ----------------------------------------------------------------------------- held-out loss


def scored_heldout_loss(model: nn.Module, examples: Sequence[dict], collate, batch_size: int = 8,
                        progress: bool | str = False) -> dict[str, float]:
    """``heldout_loss`` with the 4-bit base dequantized once and an optional progress bar."""
    n_batches = -(-len(examples) // batch_size)
    with cached_dequantize(model):
        bar = progress_bar(progress if isinstance(progress, str) else "held-out loss", n_batches, bool(progress))
        try:
            return heldout_loss(model, examples, collate, batch_size, bar)
        finally:
            if bar is not None:
                bar.close()


# ----------------------------------------------------------------------------- generation


def _as_conversation(prompt: str | Conversation, system_prompt: str | None) -> Conversation:
    conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and conv[0]["role"] != "system":
        conv = [{"role": "system", "content": system_prompt}] + conv
    return conv


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str | Conversation], max_new_tokens: int = 128,
             batch_size: int = 8, system_prompt: str | None = None, chat_template: str | None = "auto",
             progress: bool | str = False, gen: Any = None) -> list[str]:
    """Replies to user prompts (or conversations), batched with left padding (greedy unless ``gen``)."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, system_prompt, chat_template,
                       progress, gen)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def generate_ids(model: nn.Module, tokenizer: Any, prompts: Sequence[str | Conversation], max_new_tokens: int = 128,
                 batch_size: int = 8, system_prompt: str | None = None,
                 chat_template: str | None = "auto", progress: bool | str = False,
                 gen: Any = None) -> list[list[int]]:
    """New token ids per prompt, cut before the first end-of-turn token: greedy, or decoded as the run's
    ``generate`` section (``gen``) says, with ``max_new_tokens`` (``progress``: a bar, labelled with
    the string if one is given)."""
    from transformers import GenerationConfig

    template = resolve_chat_template(tokenizer, chat_template)
    eos = sorted(end_of_turn_ids(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if gen is not None:
        config = GenerationConfig(**{**generation_kwargs(gen, eos, pad_id), "max_new_tokens": max_new_tokens})
    else:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=pad_id, eos_token_id=eos)
    rows = [render_ids(tokenizer, _as_conversation(p, system_prompt), template, add_generation_prompt=True)
            for p in prompts]
    n_batches = -(-len(prompts) // batch_size)
    bar = progress_bar(progress if isinstance(progress, str) else "decode", n_batches * max_new_tokens,
                       bool(progress))
    try:
        return generate_batched(model, rows, config, pad_id, eos, batch_size, bar,
                                **(decode_options(gen) if gen is not None else {}))
    finally:
        if bar is not None:
            bar.close()


def side_by_side(model: nn.Module, tokenizer: Any, prompts: Sequence[str] = STUDY_PROMPTS, **kw: Any) -> list[dict]:
    """[{"prompt", "base", "finetuned"}] for each prompt (base = adapters disabled)."""
    from loralab.core.inject import disable_adapters

    label = kw.pop("progress", False)
    tuned = generate(model, tokenizer, prompts, **kw, progress=label and "prompts (fine-tuned)")
    with disable_adapters(model):
        base = generate(model, tokenizer, prompts, **kw, progress=label and "prompts (base)")
    return [{"prompt": p, "base": b, "finetuned": t} for p, b, t in zip(prompts, base, tuned)]


# ----------------------------------------------------------------------------- GSM8K


_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """'$1,000.50' -> '1000.5', '18.00' -> '18', '-3' -> '-3'; None if not a number."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "").strip()
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The model's answer: first number after the last "####" if any, else the last number in the text."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found:
            return normalize_number(found.group(0))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


_ANSWER_LINE = re.compile(r"####\s*-?\$?\s*[\d,]*\.?\d+\s*\.?\s*$")


def ends_in_answer_format(text: str) -> bool:
    """Does the output end in GSM8K's answer line, ``#### <number>`` (the training answers' last line)?"""
    return bool(_ANSWER_LINE.search(text.strip()))


def loops(tokens: Sequence[int], n: int = 8, times: int = 3) -> bool:
    """Does some n-token sequence occur ``times`` or more times (overlaps count)? A model stuck repeating
    a sentence until the token limit does; a worked answer almost never repeats 8 tokens thrice."""
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def gsm8k_reference(answer: str) -> str:
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    value = normalize_number(answer.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"GSM8K answer's '####' line is not a number: {answer.rsplit('####', 1)[1]!r}")
    return value


def gsm8k_exact_match(model: nn.Module, tokenizer: Any, problems: Sequence[dict], max_new_tokens: int = 256,
                      batch_size: int = 8, **kw: Any) -> dict:
    """Greedy-decoded exact match on ``problems`` ({"question", "answer"}); records every prediction."""
    if not problems:
        raise ValueError("gsm8k_exact_match needs at least one problem")
    outputs = generate(model, tokenizer, [p["question"] for p in problems], max_new_tokens, batch_size, **kw)
    records = []
    for problem, output in zip(problems, outputs):
        ref, pred = gsm8k_reference(problem["answer"]), extract_final_number(output)
        records.append({"question": problem["question"], "reference": ref, "prediction": pred,
                        "correct": pred == ref, "output": output, "answer_format": ends_in_answer_format(output),
                        "loops": loops(tokenizer(output, add_special_tokens=False)["input_ids"])})
    n = len(records)
    return {"exact_match": sum(r["correct"] for r in records) / n, "n": n,
            "answer_format": sum(r["answer_format"] for r in records) / n,
            "looping": sum(r["loops"] for r in records) / n, "records": records}
