"""The training fast path of a LoRA layer: base matmul + LoRA branch + dropout as one autograd node.

    y = x W^T + b + s B A drop(x)      for a frozen W (nn.Linear, GPT-2 Conv1D, or a 4-bit base)

Why one node: plain autograd would keep an N x out temporary for the update, add it with a second pass,
and sum the two gradients w.r.t. x in a third; here the update is accumulated in place into the base
output and both gradients into one buffer. Dropout draws 16 random bits per element (:func:`keep_mask`);
the node saves those bits (2 bytes per input element) rather than the masked input and a float mask
(8 bytes), and rebuilds the mask in backward. The N x in temporaries of the dropout path (mask, masked
input, the LoRA part of dx) live in a per-thread scratch reused by every layer of the same shape: on
CPU, fresh multi-MB tensors are new mappings whose page faults cost more than the passes that fill them
(measured on a 384-wide encoder, 4096 rows: ~2,000 faults per layer step with fresh tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab.core.scratch import scratch

SCRATCH_MAX_BYTES = 64 << 20  # larger temporaries are allocated normally (their faults are small next to the matmuls)


def _scratch(like: torch.Tensor, slot: int) -> torch.Tensor:
    """A reusable tensor shaped like ``like`` (slot 0 or 1: two live at once); fresh when above the cap."""
    if like.numel() * like.element_size() > SCRATCH_MAX_BYTES:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return scratch(f"lora-dropout-{slot}", like.shape, like.dtype, like.device)


def dropout_bits(x: torch.Tensor) -> torch.Tensor:
    """16 fresh random bits per element of ``x`` (int16, x's shape): four lanes of each int64 draw."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    return words.view(torch.int16)[:n].view(x.shape)


def _keep_from_bits(bits: torch.Tensor, drop: int, dtype: torch.dtype, out: torch.Tensor | None = None):
    keep = torch.empty(bits.shape, dtype=dtype, device=bits.device) if out is None else out
    return torch.ge(bits, drop - 32768, out=keep)  # the compare writes floats directly: no bool pass


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout keep-mask (1 with probability 1 - p, else 0) in x's dtype, and the exact drop probability used.

    Each element gets 16 fresh random bits and is dropped when they fall below round(p * 2^16), so p is
    honoured up to 2^-16 (0.1 -> 0.100006); on CPU this costs a quarter of torch's dropout kernel. The
    caller rescales by 1 / (1 - p_used), keeping the update unbiased.
    """
    drop = round(p * 65536)
    return _keep_from_bits(dropout_bits(x), drop, x.dtype), drop / 65536


class BasePlusLora(torch.autograd.Function):
    """y = x W^T + b + s B A drop(x) for a frozen W, as one autograd node (x is N x in).

    With the keep mask m and c = 1 / (1 - p), drop(x) = c (m * x); write x_m = m * x, h = x_m A^T.
    Forward: the base addmm, h (one matmul for all slices), then ``y[:, slot] += s c h_i B_i^T`` in place
    (no autograd views, no extra N x out tensor). Backward, with g = dL/dy and g_h = s c g B (per slice):
        dL/dB = s c g^T h,   dL/dA = g_h^T x_m,   dL/dx = g W + (g_h A) * m,   dL/db = sum_rows g
    Saved for backward: x, h (N x r*k) and, with dropout, the 16-bit draws that give m (m and x_m are
    rebuilt from them). A 4-bit base passes ``weight=None`` and ``rebuild``, which returns W in the
    compute dtype; W is rebuilt again in backward, never saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, s: float, p: float, transposed: bool, plan, rebuild=None):
        ctx.rebuild = rebuild
        w = rebuild() if rebuild is not None else weight
        w_t = w if transposed else w.t()  # (in, out)
        y = torch.addmm(bias, x, w_t) if bias is not None else x @ w_t
        bits, drop, x_m = None, 0, x
        if p > 0:
            bits, drop = dropout_bits(x), round(p * 65536)
            x_m = torch.mul(x, _keep_from_bits(bits, drop, x.dtype, _scratch(x, 0)), out=_scratch(x, 1))
        sc = s / (1.0 - drop / 65536)
        h = F.linear(x_m, A)
        del x_m  # rebuilt in backward from x and the bits
        if plan is None:
            y.addmm_(h, B.t(), alpha=sc)
        else:
            r, d, slices = plan
            for i, slot in slices:
                y[:, slot * d:(slot + 1) * d].addmm_(h[:, i * r:(i + 1) * r], B[i * d:(i + 1) * d].t(), alpha=sc)
        ctx.save_for_backward(x, h, weight, A, B, bits)
        ctx.meta = (sc, transposed, plan, drop)
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, weight, A, B, bits = ctx.saved_tensors
        sc, transposed, plan, drop = ctx.meta
        keep = None if bits is None else _keep_from_bits(bits, drop, x.dtype, _scratch(x, 0))
        if ctx.rebuild is not None and ctx.needs_input_grad[0]:
            weight = ctx.rebuild()
        if plan is None:
            g_h = F.linear(g, B.t().contiguous()).mul_(sc)  # g B, in the faster (weight^T) GEMM layout
            g_B = (h.t() @ g).t().mul_(sc) if ctx.needs_input_grad[4] else None
        else:
            r, d, slices = plan
            g_h, g_B = h.new_empty(h.shape), B.new_empty(B.shape)
            for i, slot in slices:
                g_slot, rows = g[:, slot * d:(slot + 1) * d], slice(i * d, (i + 1) * d)
                g_h[:, i * r:(i + 1) * r] = F.linear(g_slot, B[rows].t().contiguous())
                g_B[rows] = (h[:, i * r:(i + 1) * r].t() @ g_slot).t()
            g_h.mul_(sc)
            g_B.mul_(sc)
        g_A = None
        if ctx.needs_input_grad[3]:
            g_A = g_h.t() @ (x if keep is None else torch.mul(x, keep, out=_scratch(x, 1)))
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = g @ (weight.t() if transposed else weight)
            if keep is None:
                g_x.addmm_(g_h, A)
            else:
                g_x.addcmul_(torch.mm(g_h, A, out=_scratch(x, 1)), keep)
        g_b = g.sum(0) if ctx.needs_input_grad[2] else None
        return g_x, None, g_b, g_A, g_B, None, None, None, None, None
