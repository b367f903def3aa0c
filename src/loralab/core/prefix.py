"""Prefix-layer tuning (Li & Liang 2021; Hu et al.'s PreLayer): trainable key/value prefixes in every layer.

Every self-attention layer i gets l_p trainable keys and values per key/value head, P_K^i, P_V^i
(n_kv x l_p x head_dim), that every query attends to in front of the real tokens:

    Attn_i(X) = softmax(Q K'^T · s + M') V',   K' = [P_K^i ; X W_K],   V' = [P_V^i ; X W_V],

with M' the model's mask with l_p always-visible columns prepended (a causal model's queries see all
prefixes and the real keys up to their own position). Positions are untouched: the prefixes carry no
position (RoPE is not applied to them; GPT-2's position embeddings still start at 0 for the first token).

How it is wired (one path for every architecture). BERT, RoBERTa, GPT-2 and Llama (transformers 5.23)
compute Q, K, V in the attention module and then call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``.
``add_prefixes`` registers one more function there, ``"loralab_prefix"``, which concatenates the module's
prefixes to K and V, extends the mask and calls the model's own eager/sdpa function; each attention module
gets a config view that names it (the model's config, and so its mask construction, is unchanged). So the
cache keeps real tokens only and ``generate`` works as before. The ``past_key_values`` route was not taken:
it shifts the real tokens' positions by l_p, makes the caller extend every attention mask (including
generate's), and BERT-style encoders build their masks without the cache. The projections cannot simply be
wrapped either (the modules ``view`` K with the input's length). MPNet does its attention inline, so its
``MPNetSelfAttention`` is wrapped by ``PrefixMPNetAttention``, which recomputes it from the same weights with
the prefixes, the mask and the relative-position bias extended by l_p columns. Flash/flex attention are refused;
GPT-2's ``reorder_and_upcast_attn`` (off by default) is bypassed: its eager path then uses the plain eager function.

Counts (L layers, d_kv = n_kv·head_dim, = d without grouped-query attention): the prefixes are
2·L·d_kv·l_p numbers. Hu et al. count PreLayer as L·d·(l_p + l_i), one d-vector of activations per special
token and layer; storing K and V directly doubles that (l_i = 0 here). ``prefix_count`` returns both.
Reparametrisation (Li & Liang): P = MLP(P'), P' an l_p x e embedding, MLP = Linear(e, h) → tanh →
Linear(h, L·2·d_kv); trainable l_p·e + e·h + h + h·2·L·d_kv + 2·L·d_kv. ``merge_reparametrization`` computes
P once and replaces the MLP by plain prefixes (done before saving). Prefixes cannot merge into base weights.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from loralab.core.blocks import find_layers, set_submodule, sublayer

ATTN_IMPL = "loralab_prefix"
ATTR = "loralab_prefix"
REPARAM_ATTR = "loralab_prefix_reparam"


class PrefixReparam(nn.Module):
    """P' (l_p x e) → tanh MLP → every layer's K and V prefixes, (L, 2, n_kv, l_p, head_dim) in all."""

    def __init__(self, n_layers: int, l_p: int, n_kv: int, head_dim: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.shape = (n_layers, 2, l_p, n_kv, head_dim)
        self.embedding = nn.Parameter(torch.randn(l_p, embed_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_layers * 2 * n_kv * head_dim))

    def layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_layers, _, l_p, n_kv, hd = self.shape
        width = 2 * n_kv * hd
        h = self.mlp[1](self.mlp[0](self.embedding))
        w, b = self.mlp[2].weight[i * width:(i + 1) * width], self.mlp[2].bias[i * width:(i + 1) * width]
        kv = (h @ w.T + b).view(l_p, 2, n_kv, hd).permute(1, 2, 0, 3)  # (2, n_kv, l_p, hd)
        return kv[0], kv[1]


class PrefixKV(nn.Module):
    """One layer's prefixes: own parameters ``key``/``value`` (n_kv, l_p, head_dim), or a slice of a
    shared ``PrefixReparam`` (held by reference: its parameters live at the model root)."""

    def __init__(self, n_kv: int, l_p: int, head_dim: int, layer_idx: int, init_std: float = 0.02,
                 reparam: PrefixReparam | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.l_p = l_p
        self.__dict__["_reparam"] = reparam  # not a submodule: counted and saved once, at the root
        if reparam is None:
            self.key = nn.Parameter(torch.randn(n_kv, l_p, head_dim) * init_std)
            self.value = nn.Parameter(torch.randn(n_kv, l_p, head_dim) * init_std)

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reparam is not None:
            return self._reparam.layer_kv(self.layer_idx)
        return self.key, self.value


class _ConfigView:
    """The model's config, except that ``_attn_implementation`` names the prefix function."""

    def __init__(self, config: Any) -> None:
        self.__dict__["_loralab_config"] = config

    def __getattr__(self, name: str) -> Any:
        if name == "_attn_implementation":
            return ATTN_IMPL
        config = self.__dict__.get("_loralab_config")
        if config is None or name.startswith("__"):  # copy/pickle probe dunders on a bare instance
            raise AttributeError(name)
        return getattr(config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_loralab_config"], name, value)


def extend_mask(mask: torch.Tensor | None, l_p: int, q_len: int, k_len: int, causal: bool,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Prepend l_p visible columns to an additive (float) or boolean (True = attend) 4-D mask. A missing
    mask of a causal model with several queries becomes an explicit additive one (bottom-right aligned)."""
    if mask is None:
        if not causal or q_len == 1:
            return None
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(k_len, device=device)[None, :]
        real = torch.zeros(q_len, k_len, dtype=dtype, device=device)
        real.masked_fill_(j > i + (k_len - q_len), torch.finfo(dtype).min)
        return torch.cat([real.new_zeros(q_len, l_p), real], dim=-1)[None, None]
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([fill(*mask.shape[:-1], l_p, dtype=mask.dtype, device=mask.device), mask], dim=-1)


def _base_attention(module: nn.Module) -> Callable:
    impl = module.config.__dict__["_loralab_config"]._attn_implementation
    source = sys.modules[type(module).__module__]
    if impl in (None, "eager"):
        return source.eager_attention_forward
    return source.ALL_ATTENTION_FUNCTIONS[impl]


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    """The registered attention function: [prefix; K], [prefix; V], extended mask, then the base function."""
    base = _base_attention(module)
    prefix = getattr(module, ATTR, None)
    if prefix is None or _CAPTURE is not None:
        if prefix is not None:  # init_prefixes_from_tokens: record this layer's real keys/values, no prefix
            _CAPTURE[prefix.layer_idx] = (key[0], value[0])
        return base(module, query, key, value, attention_mask, **kwargs)
    pk, pv = prefix.kv()
    b, q_len, k_len = key.shape[0], query.shape[2], key.shape[2]
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    mask = extend_mask(attention_mask, prefix.l_p, q_len, k_len, causal, query.dtype, query.device)
    key = torch.cat([pk.to(key.dtype)[None].expand(b, -1, -1, -1), key], dim=2)
    value = torch.cat([pv.to(value.dtype)[None].expand(b, -1, -1, -1), value], dim=2)
    return base(module, query, key, value, mask, **kwargs)


class PrefixMPNetAttention(nn.Module):
    """MPNetSelfAttention with prefixes: softmax((Q [P_K; K]^T)/sqrt(hd) + [0; bias] + [0; M]) [P_V; V] W_o."""

    def __init__(self, base_layer: nn.Module, prefix: PrefixKV) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.loralab_prefix = prefix

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, output_attentions: bool = False, **kwargs: Any) -> tuple:
        base, (pk, pv) = self.base_layer, self.loralab_prefix.kv()
        b, t, hd = hidden_states.shape[0], hidden_states.shape[1], base.attention_head_size
        if _CAPTURE is not None:  # init_prefixes_from_tokens: the layer's own keys/values, no prefix
            _CAPTURE[self.loralab_prefix.layer_idx] = tuple(
                getattr(base, n)(hidden_states).view(b, t, -1, hd).transpose(1, 2)[0] for n in "kv")
            return base(hidden_states, attention_mask, position_bias, output_attentions, **kwargs)
        q, k, v = (getattr(base, n)(hidden_states).view(b, t, -1, hd).transpose(1, 2) for n in "qkv")
        k = torch.cat([pk.to(k.dtype)[None].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.to(v.dtype)[None].expand(b, -1, -1, -1), v], dim=2)
        scores = q @ k.transpose(-1, -2) / hd ** 0.5
        l_p = pk.shape[1]
        if position_bias is not None:
            scores = scores + torch.cat([position_bias.new_zeros(*position_bias.shape[:-1], l_p), position_bias], -1)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                    ~attention_mask, torch.finfo(scores.dtype).min)
            scores = scores + extend_mask(attention_mask, l_p, t, t, False, scores.dtype, scores.device)
        probs = base.dropout(nn.functional.softmax(scores, dim=-1))
        out = base.o((probs @ v).transpose(1, 2).reshape(b, t, -1))
        return (out, probs) if output_attentions else (out,)


def _heads(model: nn.Module, attn: nn.Module) -> tuple[int, int]:
    """(n_kv, head_dim) of an attention module."""
    config = getattr(model, "config", None)
    n_heads = getattr(config, "num_attention_heads", None) or getattr(attn, "num_heads")
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
    head_dim = head_dim or getattr(config, "hidden_size") // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return int(n_kv), int(head_dim)


def prefix_count(n_layers: int, d: int, l_p: int, l_i: int = 0, d_kv: int | None = None) -> dict[str, int]:
    """{"paper": L·d·(l_p + l_i) (Hu et al.: one activation per token and layer), "kv": 2·L·d_kv·(l_p + l_i)
    (K and V prefixes, what ``add_prefixes`` trains without reparametrisation)}."""
    return {"paper": n_layers * d * (l_p + l_i), "kv": 2 * n_layers * (d_kv or d) * (l_p + l_i)}


def add_prefixes(model: nn.Module, l_p: int = 10, reparam: bool = False, reparam_dim: int = 512,
                 reparam_hidden: int = 512, init_std: float = 0.02) -> dict[str, Any]:
    """Give every self-attention layer l_p trainable K/V prefixes (in place) and freeze everything else.
    Returns {"n_layers", "d_kv", "l_p", "path", "count"} (count: the parameters made trainable)."""
    if l_p < 1:
        raise ValueError(f"prefix length l_p must be >= 1, got {l_p}")
    if any(isinstance(m, PrefixKV) for m in model.modules()):
        raise ValueError("the model already has prefixes; build a fresh base model for another set")
    prefix_path, layers = find_layers(model)
    attns = [(f"{prefix_path}.{i}.{p}", m) for i, layer in enumerate(layers) for p, m in [sublayer(layer, "attention")]]
    inline = type(attns[0][1]).__name__ == "MPNetSelfAttention"
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "eager") or "eager"
    if not inline and impl not in ("eager", "sdpa"):
        raise NotImplementedError(f"prefix_layer supports attn_implementation 'eager' or 'sdpa', not {impl!r}: "
                                  "load the model with attn_implementation='sdpa'")
    n_kv, head_dim = _heads(model, attns[0][1])
    for p in model.parameters():
        p.requires_grad_(False)
    ref = next(model.parameters())
    shared = None
    if reparam:
        shared = PrefixReparam(len(attns), l_p, n_kv, head_dim, reparam_dim, reparam_hidden).to(ref.device)
        setattr(model, REPARAM_ATTR, shared)
    if not inline:
        type(sys.modules[type(attns[0][1]).__module__].ALL_ATTENTION_FUNCTIONS).register(ATTN_IMPL, prefix_attention)
    for i, (name, attn) in enumerate(attns):
        kv = PrefixKV(n_kv, l_p, head_dim, i, init_std, shared).to(ref.device)
        if inline:
            set_submodule(model, name, PrefixMPNetAttention(attn, kv))
        else:
            setattr(attn, ATTR, kv)
            attn.config = _ConfigView(attn.config)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"n_layers": len(attns), "d_kv": n_kv * head_dim, "l_p": l_p,
            "path": "mpnet-wrapper" if inline else "attention-function", "count": count}


_CAPTURE: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
"""Set only inside ``init_prefixes_from_tokens``: each layer's real keys/values, by layer index."""


@torch.no_grad()
def init_prefixes_from_tokens(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Li & Liang's initialisation from real words' activations: every layer's prefixes become the keys
    and values the frozen model itself computes for the l_p tokens ``input_ids`` (1-D) at positions
    0..l_p-1 (Llama: after RoPE), P_K^i = (X W_K^i)[0:l_p], P_V^i = (X W_V^i)[0:l_p]. The prefixes then start
    as the model's own activations for a real text, not as random keys that every query attends to."""
    global _CAPTURE
    mods = prefix_modules(model)
    if not mods:
        raise ValueError("the model has no prefixes: apply prefix_layer (add_prefixes) first")
    if getattr(model, REPARAM_ATTR, None) is not None:
        raise ValueError("prefixes computed by the reparametrisation MLP cannot be set from tokens: "
                         "initialise plain prefixes (prefix_reparam off)")
    l_p = mods[0][1].l_p
    if input_ids.dim() != 1 or len(input_ids) != l_p:
        raise ValueError(f"init_prefixes_from_tokens needs exactly l_p = {l_p} token ids (1-D), got shape "
                         f"{tuple(input_ids.shape)}")
    was_training, _CAPTURE = model.training, {}
    try:
        model.eval()
        model(input_ids=input_ids[None].to(next(model.parameters()).device))
        captured = _CAPTURE
    finally:
        _CAPTURE = None
        model.train(was_training)
    for _, kv in mods:
        k, v = captured[kv.layer_idx]
        kv.key.copy_(k.to(kv.key.dtype))
        kv.value.copy_(v.to(kv.value.dtype))


def prefix_modules(model: nn.Module) -> list[tuple[str, PrefixKV]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PrefixKV)]


@torch.no_grad()
def merge_reparametrization(model: nn.Module) -> None:
    """Replace the MLP reparametrisation by the plain prefixes it computes now (no-op without one)."""
    shared = getattr(model, REPARAM_ATTR, None)
    if shared is None:
        return
    trainable = shared.embedding.requires_grad
    for _, kv in prefix_modules(model):
        k, v = shared.layer_kv(kv.layer_idx)
        kv.key, kv.value = nn.Parameter(k.clone(), trainable), nn.Parameter(v.clone(), trainable)
        kv.__dict__["_reparam"] = None
    delattr(model, REPARAM_ATTR)


WHY_NO_MERGE = ("prefix tuning cannot be merged into the base weights: the prefixes are extra keys and values every "
                "query attends to (they change the softmax's normaliser for every token), which no change of W_q, "
                "W_k, W_v or W_o reproduces. Keep them in the model (save_method saves them); use "
                "merge_reparametrization to fold the reparametrisation MLP into plain prefixes.")


def merge_prefixes(model: nn.Module) -> None:
    """Always raises: prefixes are extra attended keys/values, not a change of any weight."""
    raise NotImplementedError(WHY_NO_MERGE)
