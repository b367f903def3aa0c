"""Left-padded, batched generation with the KV cache, shared by every generative experiment.

Prompts (token id lists) are sorted by length so that a batch carries little padding, decoded as a
``transformers.GenerationConfig`` says, and the new tokens of each prompt are cut before the first stop
id and returned in the prompts' order.

Two backends (``generate.backend``):

* ``loralab`` (default): decode a merged copy of the model (``core.merged_copy``: each adapter folded
  into its weight in float32, then rounded once to ``generate.dtype``; the trained adapter stays
  unmerged in the run). Beam search and greedy decoding run ``tasks.common.beam`` (transformers'
  semantics: in float32 the same tokens; the prompt runs once per example, not once per beam, done
  examples leave the batch, a preallocated cache); sampling runs transformers' ``generate`` on the copy. A model
  whose method cannot be folded into weights (bottleneck adapters, prefixes) is decoded as it is.
* ``transformers``: ``model.generate`` on the model as it is (the reference; a 4-bit base is dequantized
  once per call with ``cached_dequantize``, not once per new token).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from loralab.core.linear4bit import cached_dequantize
from loralab.core.merged_copy import merged_copy, mergeable
from loralab.core.precision import resolve_compute_dtype


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


def decode_options(gen: Any) -> dict[str, Any]:
    """``generate_batched``'s backend and dtype from a ``GenerateConfig``."""
    return {"backend": gen.backend, "dtype": gen.dtype}


def _own_search(config: Any) -> str | None:
    """``beam`` or ``greedy`` where ``tasks.common.beam`` has transformers' semantics for ``config``
    (no sampling, no logits processor but the n-gram ban), else None (``generate``)."""
    if config.do_sample or (config.repetition_penalty or 1.0) != 1.0 or (config.min_new_tokens or 0) > 0:
        return None
    if config.num_beams > 1:
        return "beam" if config.early_stopping is False else None
    return "greedy"


@torch.no_grad()
def generate_batched(model: nn.Module, prompts: Sequence[Sequence[int]], config: Any, pad_id: int,
                     stop_ids: Sequence[int], batch_size: int, bar: Any = None, backend: str = "loralab",
                     dtype: str | torch.dtype = "auto") -> list[list[int]]:
    """New token ids for each prompt, cut before the first of ``stop_ids`` (``bar``: advanced once per
    decoding step; a batch that stops early counts its unused steps as done). ``dtype``: the merged
    copy's (``auto``: bf16 where the device computes it fast, else float32); unused by ``transformers``."""
    if backend not in ("loralab", "transformers"):
        raise ValueError(f"generate.backend must be 'loralab' or 'transformers', got {backend!r}")
    device = next(model.parameters()).device
    if isinstance(dtype, str):
        dtype = resolve_compute_dtype(dtype, device)[0]
    was_training = model.training
    model.eval()
    try:
        if backend == "loralab" and mergeable(model):
            decoder = merged_copy(model, dtype)
            return _decode(decoder, prompts, config, pad_id, stop_ids, batch_size, bar, _own_search(config))
        with cached_dequantize(model):
            return _decode(model, prompts, config, pad_id, stop_ids, batch_size, bar, None)
    finally:
        model.train(was_training)


def _decode(model: nn.Module, prompts: Sequence[Sequence[int]], config: Any, pad_id: int, stop_ids: Sequence[int],
            batch_size: int, bar: Any, own: str | None) -> list[list[int]]:
    from loralab.tasks.common.beam import beam_search, greedy_search, stepper

    stops = set(stop_ids)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    replies: list[list[int]] = [[] for _ in prompts]
    criteria = _tick_criteria(bar) if bar is not None and not own else None
    steps_of = stepper(model) if own else None  # one per model, for every batch
    taken = [0]  # steps the last beam search ran

    def tick(step: int) -> None:
        taken[0] = step
        if bar is not None:
            bar.update(1)

    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + list(prompts[i]) for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        if own == "beam":
            rows = beam_search(model, ids, mask, config.num_beams, config.max_new_tokens, eos, config.length_penalty,
                               config.no_repeat_ngram_size or 0, pad_id, on_step=tick, steps=steps_of)
            steps = taken[0]
        elif own == "greedy":
            rows = greedy_search(model, ids, mask, config.max_new_tokens, eos, config.no_repeat_ngram_size or 0,
                                 on_step=tick, steps=steps_of)
            steps = taken[0]
        else:
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 stopping_criteria=criteria)
            rows, steps = out[:, width:].tolist(), out.shape[1] - width
        if bar is not None:
            bar.update(config.max_new_tokens - steps)
        for i, row in zip(idx, rows):
            stop = next((j for j, t in enumerate(row) if t in stops), len(row))
            replies[i] = row[:stop]
    return replies
