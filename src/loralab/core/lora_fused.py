"""The training fast path of a LoRA layer: base matmul + LoRA branch + dropout as one autograd node.

    y = x W^T + b + s B A drop(x)      for a frozen W (nn.Linear, GPT-2 Conv1D, or a 4-bit base)

Why one node: plain autograd would keep an N x out temporary for the update, add it with a second pass,
and sum the two gradients w.r.t. x in a third; here the update is accumulated in place into the base
output and both gradients into one buffer.

Dropout draws one 64-bit seed from torch's CPU generator per call (so ``torch.manual_seed`` and a
checkpoint's RNG state fix it) and gives element i of x 16 random bits: lane i % 4 (low lane first) of
word i // 4 of the SplitMix64 stream of that seed (:func:`splitmix64_words`); the element is dropped when
its bits are below round(p * 2^16). The bits of any element can be computed on their own, so the node
saves only the seed and backward rebuilds the mask. On CPU fp32 the C kernel of :mod:`loralab.core.native`
applies the mask in the same pass that computes it (torch's serial mt19937 generator alone took ~1.5 ms
per 4096 x 384 input); everywhere else (GPU, float64, no compiler) the torch twin below gives the same
bits. The N x in temporaries live in a per-thread scratch reused by every layer of the same shape: on
CPU, fresh multi-MB tensors are new mappings whose page faults cost more than the passes that fill them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab.core import native
from loralab.core.scratch import scratch

SCRATCH_MAX_BYTES = 64 << 20  # larger temporaries are allocated normally (their faults are small next to the matmuls)
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_LANE_SIGNS = 0x8000800080008000  # flips each 16-bit lane's top bit: unsigned lane order -> int16 order


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64_words(n_words: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Words 0..n_words-1 of the SplitMix64 stream of ``seed`` (int64 bit patterns; products wrap mod 2^64):
    ``word(w) = mix(seed + (w + 1) * 0x9E3779B97F4A7C15)``, mix as in Steele, Lea & Flood (2014)."""
    z = torch.arange(1, n_words + 1, dtype=torch.int64, device=device).mul_(_int64(_GOLDEN)).add_(_int64(seed))
    z = (z ^ _shift_right(z, 30)).mul_(_int64(_MIX1))
    z = (z ^ _shift_right(z, 27)).mul_(_int64(_MIX2))
    return z ^ _shift_right(z, 31)


def draw_seed() -> int:
    """One 64-bit seed from torch's default CPU generator (no device sync on a GPU)."""
    return int(torch.empty(1, dtype=torch.int64).random_(-(2**63), None).item())


def _scratch(like: torch.Tensor, slot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reusable tensor shaped like ``like``, in its dtype unless ``dtype`` (slot 0 or 1: two live at once;
    slot 2: the float32 mask of a 16-bit input); fresh when above the cap."""
    dtype = dtype or like.dtype
    if like.numel() * dtype.itemsize > SCRATCH_MAX_BYTES:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return scratch(f"lora-dropout-{slot}", like.shape, dtype, like.device)


def keep_from_seed(like: torch.Tensor, seed: int, drop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The keep mask (1 where kept, 0 where dropped) of ``seed`` for a tensor like ``like``, in its dtype."""
    keep = torch.empty(like.shape, dtype=like.dtype, device=like.device) if out is None else out
    if native.dropout(None, keep, seed, drop):
        return keep
    if keep.dtype != torch.float32 and keep.device.type == "cpu" and native.library() is not None:
        # bf16 compute: the kernel writes the mask as float32 (one pass), copied exactly (0/1) into keep;
        # the torch twin below costs ~8 int64 passes over the tensor
        keep32 = _scratch(like, 2, torch.float32)
        if native.dropout(None, keep32, seed, drop):
            return keep.copy_(keep32)
    n = like.numel()
    words = splitmix64_words((n + 3) // 4, seed, like.device) ^ _int64(_LANE_SIGNS)
    lanes = words.view(torch.int16)[:n].view(like.shape)  # little-endian: lane 0 is the low 16 bits
    return torch.ge(lanes, drop - 32768, out=keep)  # the compare writes floats directly: no bool pass


def _masked(x: torch.Tensor, seed: int, drop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x * keep in scratch slot 1, the torch mask in slot 0 or None): the kernel does it in one pass; the
    torch path builds the mask, which the caller may reuse while slot 0 is untouched."""
    out = _scratch(x, 1)
    if native.dropout(x, out, seed, drop):
        return out, None
    keep = keep_from_seed(x, seed, drop, _scratch(x, 0))
    return torch.mul(x, keep, out=out), keep


def _add_masked(acc: torch.Tensor, t: torch.Tensor, seed: int, drop: int, keep: torch.Tensor | None) -> None:
    """acc += t * keep (t lives in scratch slot 1; a mask not given is rebuilt, by the kernel or in slot 0)."""
    if keep is None and native.dropout(t, acc, seed, drop, accumulate=True):
        return
    acc.addcmul_(t, keep if keep is not None else keep_from_seed(t, seed, drop, _scratch(t, 0)))


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout keep-mask (1 with probability 1 - p, else 0) in x's dtype, and the exact drop probability used.

    Draws a seed (:func:`draw_seed`) exactly as the fused node does, so after the same ``torch.manual_seed``
    it returns the node's mask. p is honoured up to 2^-16 (0.1 -> 0.100006); the caller rescales by
    1 / (1 - p_used), keeping the update unbiased.
    """
    drop = round(p * 65536)
    return keep_from_seed(x, draw_seed(), drop), drop / 65536


class BasePlusLora(torch.autograd.Function):
    """y = x W^T + b + s B A drop(x) for a frozen W, as one autograd node (x is N x in).

    With the keep mask m of the call's seed and c = 1 / (1 - p), drop(x) = c (m * x); write x_m = m * x,
    h = x_m A^T.
    Forward: the base addmm, h (one matmul for all slices), then ``y[:, slot] += s c h_i B_i^T`` in place
    (no autograd views, no extra N x out tensor). Backward, with g = dL/dy and g_h = s c g B (per slice):
        dL/dB = s c g^T h,   dL/dA = g_h^T x_m,   dL/dx = g W + (g_h A) * m,   dL/db = sum_rows g
    Saved for backward: x and h (N x r*k); with dropout, the seed (m and x_m are rebuilt from it).
    A 4-bit base passes ``weight=None`` and ``rebuild``, which returns W in the compute dtype; W is
    rebuilt again in backward, never saved.
    bf16 compute: x and W in bfloat16 with A and B kept in float32 (the trained weights) -- A and B are
    rounded to x's dtype for the call (r x in and out x r: tiny), every product runs on the 16-bit units,
    and dL/dA, dL/dB come back in float32 for the optimizer.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, s: float, p: float, transposed: bool, plan, rebuild=None):
        ctx.rebuild = rebuild
        ctx.master_dtypes = (A.dtype, B.dtype)
        A, B = A.to(x.dtype), B.to(x.dtype)  # no-op unless a half-precision x meets float32 adapters
        w = rebuild() if rebuild is not None else weight
        w_t = w if transposed else w.t()  # (in, out)
        y = torch.addmm(bias, x, w_t) if bias is not None else x @ w_t
        seed, drop, x_m = 0, round(p * 65536), x
        if drop > 0:
            seed = draw_seed()
            x_m = _masked(x, seed, drop)[0]
        sc = s / (1.0 - drop / 65536)
        h = F.linear(x_m, A)
        del x_m  # rebuilt in backward from x and the seed
        if plan is None:
            y.addmm_(h, B.t(), alpha=sc)
        else:
            r, d, slices = plan
            for i, slot in slices:
                y[:, slot * d:(slot + 1) * d].addmm_(h[:, i * r:(i + 1) * r], B[i * d:(i + 1) * d].t(), alpha=sc)
        ctx.save_for_backward(x, h, weight, A, B)
        ctx.meta = (sc, transposed, plan, drop, seed)
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, weight, A, B = ctx.saved_tensors
        sc, transposed, plan, drop, seed = ctx.meta
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
        g_A, keep = None, None  # keep: the torch path's mask, built once for both uses below
        if ctx.needs_input_grad[3]:
            x_m, keep = (x, None) if drop == 0 else _masked(x, seed, drop)
            g_A = g_h.t() @ x_m
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = g @ (weight.t() if transposed else weight)
            if drop == 0:
                g_x.addmm_(g_h, A)
            else:
                _add_masked(g_x, torch.mm(g_h, A, out=_scratch(x, 1)), seed, drop, keep)
        g_b = g.sum(0) if ctx.needs_input_grad[2] else None
        a_dtype, b_dtype = ctx.master_dtypes
        g_A = g_A.to(a_dtype) if g_A is not None else None
        g_B = g_B.to(b_dtype) if g_B is not None else None
        return g_x, None, g_b, g_A, g_B, None, None, None, None, None
