"""The LM head and the cross-entropy in one pass over row chunks: the (tokens x vocab) logits never exist.

For hidden states h (N x d), head weight W (V x d), labels y and label smoothing eps, with z = h W^T,

    l_t = (1 - eps) (lse(z_t) - z_t[y_t]) + eps (lse(z_t) - mean_v z_t[v]),     loss = sum_{y_t != -100} l_t
    dl_t/dz_t = softmax(z_t) - (1 - eps) onehot(y_t) - eps / V
    dL/dh = (dL/dz) W,   dL/dW = (dL/dz)^T h          (rows with y_t = -100 contribute nothing)

Only rows that carry a label are computed at all (prompt tokens under ``loss_on=assistant`` and padding
cost nothing), ``rows`` of them at a time: each chunk's logits are formed (in the matmul dtype, bf16
under bf16 compute), widened to float32 for the log-sum-exp and the softmax, and turned at once into
the chunk's gradient, so the forward already holds dL/dh and the backward is one multiply. For
SmolLM2's 49,152-token vocabulary and 4 x 256 tokens this replaces ~0.6 GB of logits, their float32
copy, log-softmax and its gradient (each a full pass over memory) with 12 MB chunks.
"""

from __future__ import annotations

import torch

from loralab.tasks.common.batches import IGNORE

CHUNK_BYTES = 12 << 20  # float32 logits per chunk: stays near the cache, large enough for an efficient GEMM


class LinearCrossEntropy(torch.autograd.Function):
    """loss_sum = sum of l_t (float32 scalar) for z = hidden weight^T; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, eps: float,
                rows: int) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab = weight.shape[0]
        picked = (labels != IGNORE).nonzero().squeeze(1)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, picked.numel(), rows):
            idx = picked[start:start + rows]
            h, y = hidden[idx], labels[idx]
            z = h @ weight.t()
            mm_dtype = z.dtype  # bf16 under bf16 compute: the gradient products run in it too
            z = z.float()
            lse = torch.logsumexp(z, dim=1)
            nll = lse - z.gather(1, y[:, None]).squeeze(1)
            loss = nll if eps == 0.0 else (1.0 - eps) * nll + eps * (lse - z.mean(dim=1))
            total += loss.sum(dtype=torch.float64)
            if want_h or want_w:
                grad_z = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad_z.scatter_add_(1, y[:, None], torch.full((len(idx), 1), eps - 1.0, device=z.device))
                if eps:
                    grad_z.sub_(eps / vocab)
                grad_z = grad_z.to(mm_dtype)
                if want_h:
                    grad_h[idx] = (grad_z @ weight.to(mm_dtype)).to(grad_h.dtype)
                if want_w:
                    grad_w += (grad_z.t() @ h.to(mm_dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total.float()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * g.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * g).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         label_smoothing: float = 0.0, rows: int | None = None) -> torch.Tensor:
    """Sum over labelled rows of the (smoothed) cross-entropy of ``hidden @ weight.T`` (float32 scalar).
    ``hidden``: (N, d), ``labels``: (N,) with -100 for rows without a target."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, d) and labels (N,), got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    rows = rows or max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    return LinearCrossEntropy.apply(hidden, weight, labels, float(label_smoothing), rows)
