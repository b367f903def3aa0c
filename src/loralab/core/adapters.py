"""Bottleneck adapters (Houlsby et al. 2019; Lin et al. 2020; Pfeiffer et al. 2021), by composition.

A bottleneck adapter of width d and bottleneck r maps a hidden state h (last dim d) to

    A(h) = h + W_up f(W_down h + b_down) + b_up,      W_down: r x d,  W_up: d x r,

with 2·d·r + r + d parameters. W_up and b_up start at zero, so a fresh adapter is the identity and the
adapted model computes exactly what the base model does. Adapter^L adds a trainable LayerNorm on the
adapter's input, A(h) = h + W_up f(W_down LN(h) + b_down) + b_up (2·d more parameters).

``AdapterWrapper(base, adapter)`` runs ``base`` and then the adapter on its output (the first element when
the base returns a tuple), so the base module stays intact as ``<path>.base_layer``. Where each variant
goes (roles as in blocks.py; L = number of transformer layers):

* ``adapter_h`` (Houlsby): after ``attn_out`` and after ``ffn_out`` in every layer, i.e. on the output of
  the attention and of the FFN output projection, before dropout, the residual add and (post-LN models)
  the LayerNorm. L̂_Adpt = 2L, L̂_LN = 0 (the model's own LayerNorms stay frozen, as in Hu et al.'s
  Adapter^H count; ``train_layernorm=True`` unfreezes the layers' own LayerNorms, Houlsby's original
  recipe, which the count then includes as L̂_LN = number of those LayerNorms).
* ``adapter_l`` (Lin): one adapter on the output of each whole transformer layer (after its MLP and, in
  post-LN models, after the layer's final LayerNorm), with its own new trainable LayerNorm on the
  adapter input. L̂_Adpt = L, L̂_LN = L. (The layer itself is wrapped, so ``output_hidden_states``
  reports the layers' outputs before their adapter; the forward itself is right.)
* ``adapter_p`` (Pfeiffer): one adapter per layer after ``ffn_out`` only (the same place as Houlsby's
  second adapter: before dropout, the residual add and the LayerNorm); no LayerNorm trains.
  L̂_Adpt = L, L̂_LN = 0.

|Θ| = L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d (Hu et al. 2021, Sec. 5.1) is ``adapter_count``. Adapters are
nonlinear in h, so they cannot be merged into the base weights (``merge_adapters`` says so).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.core.blocks import find_layers, hidden_size, out_features, set_submodule, sublayer

VARIANTS = ("adapter_h", "adapter_l", "adapter_p")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """h + W_up f(W_down [LN](h) + b_down) + b_up; W_up, b_up = 0 at init (identity)."""

    def __init__(self, d: int, r: int, activation: str = "relu", layernorm: bool = False,
                 init_std: float = 1e-2) -> None:
        super().__init__()
        if r < 1 or d < 1:
            raise ValueError(f"adapter sizes must be >= 1, got d={d}, r={r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"adapter activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.layernorm = nn.LayerNorm(d) if layernorm else None
        self.down = nn.Linear(d, r)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, d)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.layernorm(h) if self.layernorm is not None else h
        x = x.to(self.down.weight.dtype)
        return h + self.up(self.act(self.down(x))).to(h.dtype)


class AdapterWrapper(nn.Module):
    """``base`` followed by ``adapter`` on its (first) output; attribute reads fall through to ``base``."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]),) + out[1:]
        return self.adapter(out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapter"):
                raise
            return getattr(self.base_layer, name)


def adapter_count(d: int, r: int, n_adapters: int, n_layernorms: int) -> int:
    """Hu et al.'s |Θ| = L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d."""
    return n_adapters * (2 * d * r + r + d) + 2 * n_layernorms * d


def _targets(model: nn.Module, variant: str) -> list[tuple[str, nn.Module]]:
    prefix, layers = find_layers(model)
    out = []
    for i, layer in enumerate(layers):
        base = f"{prefix}.{i}" if prefix else str(i)
        if variant == "adapter_l":
            out.append((base, layer))
            continue
        roles = ("attn_out", "ffn_out") if variant == "adapter_h" else ("ffn_out",)
        for role in roles:
            path, module = sublayer(layer, role)
            out.append((f"{base}.{path}", module))
    return out


def layer_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer layers' own LayerNorm/RMSNorm modules (for ``train_layernorm``)."""
    prefix, layers = find_layers(model)
    return [(f"{prefix}.{i}.{n}", m) for i, layer in enumerate(layers) for n, m in layer.named_modules()
            if "norm" in type(m).__name__.lower() and not isinstance(m, BottleneckAdapter)
            and ".adapter" not in f".{n}"]


def add_adapters(model: nn.Module, variant: str, r: int = 8, activation: str = "relu",
                 train_layernorm: bool = False, init_std: float = 1e-2) -> dict[str, int]:
    """Insert ``variant``'s adapters (in place), freeze every other parameter; returns the formula's terms
    {"d", "r", "n_adapters" (L̂_Adpt), "n_layernorms" (L̂_LN), "count"} where count is the size of the
    parameters it made trainable (= ``adapter_count(d, r, L̂_Adpt, L̂_LN)`` when every norm is a
    LayerNorm of width d; a trained RMSNorm has d, not 2·d). The head is the caller's business (methods.py)."""
    if variant not in VARIANTS:
        raise ValueError(f"adapter variant must be one of {VARIANTS}, got {variant!r}")
    if train_layernorm and variant != "adapter_h":
        raise ValueError(f"train_layernorm applies to adapter_h only ({variant} has a fixed LayerNorm rule)")
    if any(isinstance(m, AdapterWrapper) for m in model.modules()):
        raise ValueError("the model already has bottleneck adapters; build a fresh base model for another set")
    targets = _targets(model, variant)
    d_model = hidden_size(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets:
        d = d_model if variant == "adapter_l" else out_features(module)
        ref = next(module.parameters())
        adapter = BottleneckAdapter(d, r, activation, layernorm=variant == "adapter_l", init_std=init_std)
        adapter.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
        set_submodule(model, name, AdapterWrapper(module, adapter))
    n_ln = len(targets) if variant == "adapter_l" else 0
    count = sum(sum(p.numel() for p in m.adapter.parameters()) for _, m in adapter_modules(model))
    if train_layernorm:  # the layers' own norms: 2·d each for LayerNorm (the formula), d for an RMSNorm
        for _, norm in layer_norms(model):
            norm.requires_grad_(True)
            n_ln += 1
            count += sum(p.numel() for p in norm.parameters())
    return {"d": d_model, "r": r, "n_adapters": len(targets), "n_layernorms": n_ln, "count": count}


def adapter_modules(model: nn.Module) -> list[tuple[str, AdapterWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterWrapper)]


WHY_NO_MERGE = ("bottleneck adapters cannot be merged into the base weights: h + W_up f(W_down h) is a nonlinear "
                "function of h (f is an activation), not a change of any weight matrix, so the adapter layers stay "
                "in the model at inference (the extra latency Hu et al. Table 1 measures). Save them with "
                "save_method instead; only LoRA merges.")


def merge_adapters(model: nn.Module) -> None:
    """Always raises: a bottleneck adapter cannot be folded into the base weights."""
    raise NotImplementedError(WHY_NO_MERGE)
