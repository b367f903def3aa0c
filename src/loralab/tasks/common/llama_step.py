"""Decoding steps for the Llama family (SmolLM2), computed here from a (merged) model's weights.

For one new token per row (rows = examples x beams, example-major), per layer, with n = RMSNorm::

    q|k|v = W_qkv n(x)                     one matmul (the three projections stacked)
    q, k  = rope(q, p), rope(k, p)          the model's own rotary module at position p
    a     = softmax(q [K_prompt; K_gen]^T * scaling + pad) [V_prompt; V_gen]  (grouped-query heads)
    h     = x + W_o a
    y     = h + W_down (silu(g) * u),  g|u = W_gate|up n(h)                  one matmul

All layers' keys and values live in one static buffer, (2 x layers, rows, Hkv, P + max_new, D), that the
stepper keeps for its next batch (fresh memory costs page faults here: zero-filling a new 177 MB buffer
took 0.65-0.8 s, refilling it 6 ms). Its prompt part (from the model's own forward over the prompt) is
written once per row; a beam's parent is always a beam of the same example, so a reorder moves only the
generated part; when an example leaves, the kept rows move up in place. Attention runs over each
layer's whole (contiguous) buffer with the unfilled tail masked: no per-step concatenation, and no copy
of a sliced operand inside the batched matmuls (the CPU's fused attention kernel is ~13x slower for one
query); what lies behind the mask is finite (zeros, or keys and values of earlier rows and batches), so
its zero weights add nothing. RMSNorm and RoPE are transformers' arithmetic; the attention's float
rounding differs from its kernels by ~1e-7 in float32 (tested against them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loralab.tasks.common.steppers import positions


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' LlamaRMSNorm: in float32, the weight applied in the input's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _user_hooks(module: nn.Module) -> list:
    """Forward hooks other than transformers' own output-capturing ones (installed for good by the first
    ``output_hidden_states=True`` call, they only record what a caller asks for)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [h for h in hooks if not getattr(h, "__module__", "").startswith("transformers.")]


class LlamaStepper:
    """Beam-search steps for a ``LlamaForCausalLM`` of plain, bias-free linear layers (``supports``)."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """A Llama with SiLU, bias-free nn.Linear projections and no hooks (a hook would be bypassed)."""
        if type(model).__name__ != "LlamaForCausalLM" or getattr(model.config, "hidden_act", None) != "silu":
            return False
        if any(_user_hooks(m) for m in model.modules()):
            return False
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
                return False
        return type(model.lm_head) is nn.Linear and model.lm_head.bias is None

    def __init__(self, model: nn.Module) -> None:
        """Stacks q|k|v and gate|up once: the stepper then serves every batch decoded with ``model``."""
        self.model = model
        attn = model.model.layers[0].self_attn
        cfg = model.config
        self.H, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        self.scaling = attn.scaling
        self.w_qkv = [torch.cat((l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight))
                      for l in model.model.layers]
        self.w_gu = [torch.cat((l.mlp.gate_proj.weight, l.mlp.up_proj.weight)) for l in model.model.layers]
        self.storage = torch.zeros(0, dtype=model.lm_head.weight.dtype)  # the key/value buffer's memory

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_len: int) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache

        self.max_len, self.gen_len = max_len, 0
        cache = DynamicCache(config=self.model.config)
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions(attention_mask), past_key_values=cache, use_cache=True)
        self.prompt_k = [layer.keys for layer in cache.layers]  # (examples, Hkv, P, D), rotated; until step 1
        self.prompt_v = [layer.values for layer in cache.layers]
        self.prompt_pad = attention_mask == 0  # (examples, P)
        self.kv: torch.Tensor | None = None  # (2 x layers, rows, Hkv, max_len, D), made at the first step
        # the head on the last position as a 2-D matmul: transformers' logits_to_keep=1 slices a 3-D view,
        # which torch runs as a batched matmul over a copy of the head per example (0.45 s per batch of 8)
        return self.model.lm_head(out.last_hidden_state[:, -1])

    def _fill(self, rows: int) -> None:
        """The key/value buffer: each example's prompt keys/values copied to its beams' rows (example-major)."""
        examples, P = self.prompt_pad.shape
        shape = (2 * len(self.prompt_k), rows, self.Hkv, self.max_len, self.D)
        size, dtype = math.prod(shape), self.prompt_k[0].dtype
        if self.storage.numel() < size or self.storage.dtype != dtype:
            self.storage = self.prompt_k[0].new_zeros(size)  # zeros: finite behind the mask
        self.kv = self.storage[:size].view(shape)
        for i, (k, v) in enumerate(zip(self.prompt_k, self.prompt_v)):
            for j, prompt in ((2 * i, k), (2 * i + 1, v)):
                self.kv[j, :, :, :P].unflatten(0, (examples, rows // examples)).copy_(prompt[:, None])
        pad = self.prompt_pad.new_zeros(rows, self.max_len)
        pad[:, :P] = self.prompt_pad.repeat_interleave(rows // examples, 0)
        self.pad = pad[:, None, None, :]  # (rows, 1, 1, max_len): True where a key is padding
        self.positions = torch.arange(self.max_len, device=pad.device)
        self.prompt_k = self.prompt_v = []

    def select(self, rows: torch.Tensor, examples: torch.Tensor) -> None:
        if self.kv is None:  # before the first step every beam's row is its example's one prompt row
            if len(examples) != self.prompt_pad.shape[0]:
                self.prompt_k = [k[examples] for k in self.prompt_k]
                self.prompt_v = [v[examples] for v in self.prompt_v]
                self.prompt_pad = self.prompt_pad[examples]
            return
        P, t, kv = self.prompt_pad.shape[1], self.gen_len, self.kv
        if len(rows) != kv.shape[1] or len(examples) != self.prompt_pad.shape[0]:
            # an example left: the kept rows move up in place (their prompt parts too); the gather reads
            # into a temporary first, so no row is overwritten before it is read
            for buf in kv:  # (one gather per layer: indexing the rows of all layers at once was 4x slower)
                buf[:len(rows), :, :P + t] = buf[rows, :, :P + t]
            self.kv = kv[:, :len(rows)]  # each layer's part stays contiguous
            self.pad, self.prompt_pad = self.pad[rows], self.prompt_pad[examples]
            return
        for buf in kv:  # parents share the prompt: the generated part only
            buf[:, :, P:P + t] = buf[rows, :, P:P + t]

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m, H, Hkv, D = self.model.model, self.H, self.Hkv, self.D
        R, P, t = len(tokens), self.prompt_pad.shape[1], self.gen_len
        G, end = H // Hkv, P + t + 1
        if self.kv is None:
            self._fill(R)
        h = m.embed_tokens(tokens)
        cos, sin = m.rotary_emb(h, (attention_mask.sum(-1, keepdim=True) - 1))
        cos, sin = cos[:, 0, None], sin[:, 0, None]  # (R, 1, D): broadcast over heads
        # attention runs over the whole buffer, the unfilled tail masked (its zero values add nothing): on a
        # slice of it the bf16 batched matmul copies its operand first (scores at 80 rows: 0.47 vs 0.17 ms)
        masked = self.pad | (self.positions >= end)
        for i, layer in enumerate(m.layers):
            qkv = _rms(h, layer.input_layernorm) @ self.w_qkv[i].T
            qk = _rotate(qkv[:, :(H + Hkv) * D].view(R, H + Hkv, D), cos, sin)  # q and k rotated at once
            keys, values = self.kv[2 * i], self.kv[2 * i + 1]
            keys[:, :, P + t] = qk[:, H:]
            values[:, :, P + t] = qkv[:, (H + Hkv) * D:].view(R, Hkv, D)
            scores = (qk[:, :H].view(R, Hkv, G, D) @ keys.transpose(-1, -2)).float() * self.scaling
            probs = scores.masked_fill_(masked, float("-inf")).softmax(-1).to(h.dtype)  # (R, Hkv, G, max_len)
            out = probs @ values  # (R, Hkv, G, D)
            h = h + out.view(R, H * D) @ layer.self_attn.o_proj.weight.T
            gu = _rms(h, layer.post_attention_layernorm) @ self.w_gu[i].T
            inner = gu.shape[1] // 2
            h = h + (F.silu(gu[:, :inner]) * gu[:, inner:]) @ layer.mlp.down_proj.weight.T
        self.gen_len = t + 1
        return _rms(h, m.norm) @ self.model.lm_head.weight.T
