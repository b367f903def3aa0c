"""The causal-LM loss and held-out loss every generative experiment uses.

``token_loss_sum`` is ``sum_t l_t`` over positions whose (shifted) label is not -100, with
``l_t = (1 - eps) * (-log p(y_t | y_<t)) + eps * mean_v(-log p(v | y_<t))`` (label smoothing eps);
the training loss is that sum divided by the number of such tokens (a token-weighted mean, so long
and short answers weigh per token, not per example). Packed rows (``segment_ids``) get a
block-diagonal causal mask so packed examples never attend to each other. Where the model allows it
(``fused_head``) the head and the loss run fused over row chunks (linear_ce.py), and only labelled
positions are scored.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loralab.tasks.common.batches import IGNORE
from loralab.tasks.common.linear_ce import linear_cross_entropy


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) segment ids (-1 = padding) -> additive (B, 1, L, L) mask: query i sees key j iff
    j <= i and seg[i] == seg[j] (padding queries see themselves, keeping softmax finite)."""
    n = segment_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed |= torch.eye(n, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _forward(module: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """``module`` (the model, or its decoder stack) on the batch; packed rows get the block-causal mask."""
    if "segment_ids" in batch:
        mask = block_causal_mask(batch["segment_ids"], _model_dtype(model))
        return module(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
    return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return _forward(model, model, batch).logits


def fused_head(model: nn.Module) -> tuple[nn.Module, torch.Tensor] | None:
    """(decoder stack, head weight) when the loss may skip the logits (see linear_ce.py): a Hugging Face
    causal LM whose output is exactly ``decoder(...)[0] @ head.weight^T`` -- a plain bias-free Linear head
    (not wrapped by LoRA), no logit scaling or soft-capping, no hooks rewriting the inputs (prefix
    embeddings), not wrapped for data parallelism. Otherwise None: the full logits are formed."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or head.bias is not None or config is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) is not None:
        return None
    if model._forward_pre_hooks or model._forward_hooks or "forward" in model.__dict__:
        return None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return (decoder, head.weight) if isinstance(decoder, nn.Module) and decoder is not model else None


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum over trained tokens of l_t, number of trained tokens); labels shift by one."""
    labels = batch["labels"][:, 1:]
    n = int((labels != IGNORE).sum())
    parts = fused_head(model)
    if parts is not None:
        decoder, weight = parts
        hidden = _forward(decoder, model, batch)[0]
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return linear_cross_entropy(hidden, weight, labels.reshape(-1), label_smoothing), n
    logits = forward_logits(model, batch)[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum", label_smoothing=label_smoothing)
    return loss, n


def mean_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss: ``token_loss_sum / n``; a batch with no trained token is an error."""
    total, n = token_loss_sum(model, batch, label_smoothing)
    if n == 0:
        raise ValueError("a batch has no token to learn from (every label is -100): check the truncation "
                         "(data.max_length) and which tokens carry the loss")
    return total / n


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: Sequence[dict], collate: Any, batch_size: int = 8,
                 bar: Any = None) -> dict[str, float]:
    """Token-weighted mean loss (no smoothing) and perplexity exp(loss) over ``examples``
    (``bar``: an optional progress bar, advanced once per batch)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(examples[start: start + batch_size])).items()}
            loss, n = token_loss_sum(model, batch)
            total, count = total + float(loss), count + n
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no held-out tokens to score (all labels are -100)")
    mean = total / count
    return {"eval_loss": mean, "eval_ppl": float(torch.tensor(mean).exp()), "eval_tokens": float(count)}
