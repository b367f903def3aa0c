"""Prefix-embedding tuning (Hu et al.'s PreEmbed): trainable prefix and infix token embeddings.

l_p prefix and l_i infix "special tokens" with trainable embeddings (not in the vocabulary) are inserted
into every input sequence; the model runs on the longer sequence, with its attention mask extended by
ones (the inserted tokens are always visible) and, for causal-LM losses, the labels by -100:

    [x_0 .. x_{a-1}]  P_1 .. P_{l_p}  [x_a .. x_{s-1}]  I_1 .. I_{l_i}  [x_s .. x_{T-1}]

``a`` = ``prefix_after``: 0 for decoders (prefixing prepends to the prompt), 1 for encoders so that the
[CLS]/<s> token BERT/RoBERTa/MPNet pool stays first. ``s`` is where the prompt ends (infixing appends to
the prompt): a per-example ``infix_at`` tensor passed to the model's forward (e.g. the length of the E2E
table part), by default after the last attended token. Inserted tokens get the neighbour's
token_type_id and the positions of the longer sequence. Trainable count: d·(l_p + l_i) exactly
(Hu et al. Sec. 5.1). Outputs are l_p + l_i positions longer than the input (token t of the input is
at t + l_p if t >= a, + l_i if t >= s). Incremental decoding (``generate``) is not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTR = "loralab_prefix_embed"


class PrefixEmbedding(nn.Module):
    """The trainable prefix (l_p x d) and infix (l_i x d) embeddings, and the input rewrite."""

    def __init__(self, d: int, l_p: int, l_i: int, prefix_after: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        if l_p < 0 or l_i < 0 or l_p + l_i == 0:
            raise ValueError(f"prefix_embed needs l_p + l_i >= 1 (both >= 0), got l_p={l_p}, l_i={l_i}")
        self.l_p, self.l_i, self.prefix_after = l_p, l_i, prefix_after
        std = float(init.std()) if init is not None else 0.02
        self.prefix = nn.Parameter(torch.randn(l_p, d) * std)
        self.infix = nn.Parameter(torch.randn(l_i, d) * std)

    def _insert(self, x: torch.Tensor, s: int, p: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        a = self.prefix_after
        return torch.cat([x[:a], p, x[a:s], i, x[s:]], dim=0)

    def rewrite(self, embed: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """input_ids (+ mask, labels, token types) → inputs_embeds with the prefix and infix inserted."""
        if kwargs.get("past_key_values") is not None:
            raise NotImplementedError("prefix_embed does not support incremental decoding (generate, or a "
                                      "past_key_values cache); run full forwards, or use prefix_layer, which does")
        if kwargs.get("position_ids") is not None:
            raise ValueError("prefix_embed computes the longer sequence's positions itself; do not pass position_ids")
        ids = kwargs.pop("input_ids", None)
        x = embed(ids) if ids is not None else kwargs.pop("inputs_embeds")
        b, t = x.shape[:2]
        mask = kwargs.get("attention_mask")
        infix_at = kwargs.pop("infix_at", None)
        if infix_at is None:  # after the last attended token (right or left padding)
            infix_at = (t - torch.argmax(mask.flip(1).to(torch.long), dim=1)) if mask is not None else torch.full((b,), t)
        infix_at = [int(v) for v in torch.as_tensor(infix_at).reshape(-1)]
        if len(infix_at) != b or not all(self.prefix_after <= s <= t for s in infix_at):
            raise ValueError(f"infix_at must hold one position in [{self.prefix_after}, {t}] per example, got {infix_at}")
        p, i = self.prefix.to(x.dtype), self.infix.to(x.dtype)
        kwargs["inputs_embeds"] = torch.stack([self._insert(x[k], s, p, i) for k, s in enumerate(infix_at)])
        fills = {"attention_mask": 1, "labels": -100}
        for key in ("attention_mask", "labels", "token_type_ids"):
            v = kwargs.get(key)
            if v is None or v.dim() != 2:
                continue
            rows = []
            for k, s in enumerate(infix_at):
                before = v[k, s - 1] if s > 0 else v[k, 0]
                fp = v.new_full((self.l_p,), fills.get(key, 0) if key != "token_type_ids" else int(v[k, 0]))
                fi = v.new_full((self.l_i,), fills[key] if key in fills else int(before))
                rows.append(self._insert(v[k], s, fp, fi))
            kwargs[key] = torch.stack(rows)
        return kwargs


def _hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    if len(args) > 1:
        raise TypeError("with prefix_embed, call the model with keyword arguments (input_ids=..., attention_mask=...)")
    if args:
        kwargs = {**kwargs, "input_ids": args[0]}
    return (), getattr(module, ATTR).rewrite(module.get_input_embeddings(), kwargs)


def add_prefix_embedding(model: nn.Module, l_p: int = 10, l_i: int = 0, prefix_after: int | None = None,
                         causal: bool = False) -> dict[str, int]:
    """Attach trainable prefix/infix embeddings (in place; a forward pre-hook rewrites the inputs) and
    freeze everything else. Returns {"d", "l_p", "l_i", "prefix_after", "count"} with count = d·(l_p + l_i)."""
    if hasattr(model, ATTR):
        raise ValueError("the model already has prefix embeddings; build a fresh base model for another set")
    get = getattr(model, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    if not isinstance(embed, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings() nn.Embedding; prefix_embed needs one")
    after = (0 if causal else 1) if prefix_after is None else prefix_after
    for p in model.parameters():
        p.requires_grad_(False)
    module = PrefixEmbedding(embed.embedding_dim, l_p, l_i, after, init=embed.weight.detach())
    setattr(model, ATTR, module.to(embed.weight.device, embed.weight.dtype))
    model.__dict__["_loralab_prefix_embed_hook"] = model.register_forward_pre_hook(_hook, with_kwargs=True)
    return {"d": embed.embedding_dim, "l_p": l_p, "l_i": l_i, "prefix_after": after,
            "count": embed.embedding_dim * (l_p + l_i)}


WHY_NO_MERGE = ("prefix embeddings cannot be merged into the base weights: they are extra input tokens the model "
                "attends to (the sequence is l_p + l_i longer), which no change of the weights reproduces. Keep them "
                "in the model (save_method saves them).")


def merge_prefix_embedding(model: nn.Module) -> None:
    """Always raises: the prefix/infix tokens are extra inputs, not a change of any weight."""
    raise NotImplementedError(WHY_NO_MERGE)
