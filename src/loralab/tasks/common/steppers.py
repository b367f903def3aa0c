"""What beam search runs per step: a model's forward with a KV cache whose rows can be reordered.

A stepper is made once per decoding model and serves every batch. Both answer ``prefill(ids, mask,
max_len)`` (a new batch: last-position logits of each left-padded prompt, once per example, and a cache
for ``max_len`` positions), ``select(rows, examples)`` (keep these rows, in this order: each beam's parent, done examples
dropped) and ``step(tokens, mask)`` (the next logits of every row, one new token each).

* ``HFStepper``: any transformers causal LM through its own forward, with a preallocated cache
  (``StaticRowLayer``: no concatenation per step).
* ``LlamaStepper``: the Llama family (SmolLM2) computed here, token by token, from the model's weights:
  q|k|v and gate|up as one matmul each, one static key/value buffer per row whose prompt part is
  written once (a beam's parent is a beam of the same example: a reorder moves only the generated
  part). Per layer, for a new token x
  at position p (RMSNorm, RoPE, grouped-query attention over prompt + generated keys, SwiGLU)::

      h = x + W_o attn(rope(W_q n(x), p), [K_prompt; K_gen], [V_prompt; V_gen])
      y = h + W_down (silu(W_gate n(h)) * W_up n(h))

  The prompt itself runs through the model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

GROW = 8
"""Cache positions added at a time (beyond the prompt)."""


def positions(mask: torch.Tensor) -> torch.Tensor:
    """transformers' position ids for a left-padded batch: cumulative count of real tokens - 1 (pads: 0)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _grow(buffer: torch.Tensor, length: int, needed: int, max_len: int) -> torch.Tensor:
    """``buffer`` (rows, heads, capacity, dim), filled up to ``length``, with room for ``needed`` positions."""
    if buffer.shape[2] >= needed:
        return buffer
    if needed > max_len:
        raise RuntimeError(f"KV cache of {max_len} positions overflowed ({needed})")
    bigger = buffer.new_empty(*buffer.shape[:2], min(max_len, needed + GROW), buffer.shape[3])
    bigger[:, :, :length] = buffer[:, :, :length]
    return bigger


def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class StaticRowLayer(DynamicLayer):
        """One layer's keys and values: (rows, heads, capacity, dim) buffers filled up to ``length``.

        Writes go into the buffer (no concatenation per step); the capacity grows in steps of ``GROW``
        positions up to ``max_len``, so that reordering rows copies little more than the filled part."""

        def __init__(self, max_len: int) -> None:
            super().__init__()
            self.max_len, self.length = max_len, 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
                self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            end = self.length + key_states.shape[2]
            self.keys = _grow(self.keys, self.length, end, self.max_len)
            self.values = _grow(self.values, self.length, end, self.max_len)
            self.keys[:, :, self.length:end] = key_states
            self.values[:, :, self.length:end] = value_states
            self.length = end
            return self.keys[:, :, :end], self.values[:, :, :end]

        def select_rows(self, index: torch.Tensor) -> None:
            """Rows ``index``, in that order (beam reordering; done examples dropped): a fresh buffer, so
            that later writes never alias rows another beam still reads."""
            if self.is_initialized:
                self.keys, self.values = self.keys[index], self.values[index]

        def get_seq_length(self, *args: Any) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
            return self.length + query_length, 0

    return StaticRowLayer


def static_cache(model: nn.Module, max_len: int) -> Any:
    """A transformers ``Cache`` whose layers are preallocated ``max_len`` buffers (no concatenation per step)."""
    from transformers.cache_utils import Cache

    n_layers = model.config.get_text_config().num_hidden_layers
    layer = _layer_class()
    return Cache(layers=[layer(max_len) for _ in range(n_layers)])


class HFStepper:
    """Any transformers causal LM, through its forward and a ``static_cache``."""

    def __init__(self, model: nn.Module) -> None:
        import inspect

        self.model = model
        self.keep_kwarg = "logits_to_keep" in inspect.signature(model.forward).parameters

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_len: int) -> torch.Tensor:
        self.cache = static_cache(self.model, max_len)
        extra = {"logits_to_keep": 1} if self.keep_kwarg else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                         past_key_values=self.cache, use_cache=True, **extra)
        return out.logits[:, -1]

    def select(self, rows: torch.Tensor, examples: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.select_rows(rows)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], attention_mask=attention_mask,
                         position_ids=attention_mask.sum(-1, keepdim=True) - 1, past_key_values=self.cache,
                         use_cache=True)
        return out.logits[:, -1]
