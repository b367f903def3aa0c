"""Left-padded, batched generation with the KV cache, shared by every generative experiment.

Prompts (token id lists) are sorted by length so that a batch carries little padding, decoded with a
``transformers.GenerationConfig`` passed through unchanged, and the new tokens of each prompt are cut
before the first stop id and returned in the prompts' order. A 4-bit base is dequantized once per call
(``cached_dequantize``), not once per new token.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from loralab.core.linear4bit import cached_dequantize


def generation_kwargs(gen: Any, eos: int | list[int], pad: int) -> dict[str, Any]:
    """``generate`` keyword arguments from a ``GenerateConfig`` (every field is read).

    Settings a model's own ``generation_config.json`` could otherwise fill in (transformers fills
    every field we leave unset from it) are pinned to neutral values: no repetition penalty, no
    minimum length, one sequence, no early stop of the beam search; top-k / top-p off when sampling.
    """
    beams, sample, penalty, temperature = gen.num_beams, gen.do_sample, gen.length_penalty, gen.temperature
    kwargs: dict[str, Any] = dict(
        max_new_tokens=gen.max_new_tokens, num_beams=beams, do_sample=sample,
        no_repeat_ngram_size=gen.no_repeat_ngram_size, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        repetition_penalty=1.0, min_new_tokens=0, num_return_sequences=1,
    )
    if beams > 1:
        kwargs.update(length_penalty=penalty, early_stopping=False)
    if sample:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    return kwargs


def _tick_criteria(bar: Any) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Tick(StoppingCriteria):  # called once per decoding step; never stops anything
        def __call__(self, input_ids, scores, **kwargs):
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Tick()])


@torch.no_grad()
def generate_batched(model: nn.Module, prompts: Sequence[Sequence[int]], config: Any, pad_id: int,
                     stop_ids: Sequence[int], batch_size: int, bar: Any = None) -> list[list[int]]:
    """New token ids for each prompt, cut before the first of ``stop_ids`` (``bar``: advanced once per
    decoding step; a batch that stops early counts its unused steps as done)."""
    stops = set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    replies: list[list[int]] = [[] for _ in prompts]
    criteria = _tick_criteria(bar) if bar is not None else None
    was_training = model.training
    model.eval()
    try:
        with cached_dequantize(model):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + list(prompts[i]) for i in idx],
                                   device=device)
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                                    device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                     stopping_criteria=criteria)
                if bar is not None:
                    bar.update(config.max_new_tokens - (out.shape[1] - width))
                for i, row in zip(idx, out[:, width:].tolist()):
                    stop = next((j for j, t in enumerate(row) if t in stops), len(row))
                    replies[i] = row[:stop]
    finally:
        model.train(was_training)
    return replies
