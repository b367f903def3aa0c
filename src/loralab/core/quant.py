"""Blockwise 4-bit quantization (NF4, FP4, Int4) and double quantization, in plain torch.

A weight ``W`` is flattened and cut into blocks of ``block_size`` values (64 by default; the last block
may be short). Per block ``b`` with ``absmax_b = max |w|`` each value is scaled to ``s = w * (1 / absmax_b)``
in [-1, 1] and stored as the index of the nearest code of a 16-entry codebook ``c``:

    q = argmin_k |s - c_k|  =  order[ #{midpoints m : m < s} ]

where ``midpoints`` lie halfway between consecutive *sorted* codes and ``order`` maps sorted position
back to the code index (FP4 codes are stored in bit-pattern order, with both +0 and -0). Counting the
midpoints strictly below ``s`` equals ``bucketize(s, midpoints)``: a value exactly on a midpoint goes to
the lower code. That tie rule, the reciprocal-multiply for full blocks and the true division for a short
last block are what bitsandbytes' CPU path does, so packed bytes and absmax are bit-identical to
``bitsandbytes.functional.quantize_4bit`` (0.50.x) on the CPU. So are bnb's all-zero blocks: a whole
block stores absmax +0.0 (never -0.0), the short last block ``max(absmax, 1e-38)`` (bnb clamps the value
it divides by and stores it), which also makes the offset of a 1x1 zero tensor 1e-38 (tested). On a GPU,
NF4/FP4 follow bnb's CUDA kernel instead, whose arithmetic differs in places (quant_cuda.py).

Double quantization (QLoRA): the fp32 absmax vector minus its mean ``offset`` is quantized to 8 bits
with the signed dynamic map in blocks of 256, each block with its own fp32 scale (nearest code through
bnb's 65536-bin lookup table, reproduced exactly; see ``quantize_8bit_blockwise``). The state layout and
its storage cost (4.127 bits per parameter at block 64) are in quant_state.py; decoding in dequant.py.
"""

from __future__ import annotations

import torch

from loralab.core import quant_cuda
from loralab.core.parallel import over_block_ranges
from loralab.core.quant_state import (FLOAT_DTYPES, NESTED_BLOCK_SIZE, QuantState, QuantType, check_block_size,
                                      codebook, dynamic_map_signed)

_BOUNDS_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _bounds(quant_type: QuantType) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted codes, sorted position -> code index as uint8)."""
    if quant_type not in _BOUNDS_CACHE:
        code = codebook(quant_type)
        order = torch.argsort(code, stable=True)  # stable: +0 (index 0) sorts before -0 (index 8), as bnb
        ordered = code[order]
        _BOUNDS_CACHE[quant_type] = ((ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8))
    return _BOUNDS_CACHE[quant_type]


_CHUNK = 1 << 14  # elements per step, in cache and below torch's intra-op grain (ops run serially)


def _codes_from_scaled(scaled: torch.Tensor, bounds: list[float], order: torch.Tensor | None,
                       out: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """uint8 code index of each scaled value: ``order[#{midpoints m : m < s}]``.

    Counting midpoints below ``s`` is ``bucketize(s, midpoints)`` (a value exactly on a midpoint goes
    to the lower code) but 15 vectorized compares are ~10x faster than a per-element binary search.
    """
    out.zero_()
    for midpoint in bounds:
        out.add_(torch.gt(scaled, midpoint, out=flags))
    if order is not None:
        out = torch.index_select(order.to(out.device), 0, out.int())
    return out


def _quantize_full_blocks(
    flat: torch.Tensor, block_size: int, bounds: list[float], order: torch.Tensor | None,
    packed: torch.Tensor, absmax: torch.Tensor,
) -> None:
    """Quantize the whole blocks of ``flat`` chunk by chunk into ``packed`` / ``absmax`` (preallocated).

    Exact bnb arithmetic: ``s = w * (1 / max(absmax, 1e-38))`` in fp32, then the nearest code; the stored
    absmax is the unclamped max |w|, +0.0 for an all-zero block (as bnb's fabs-based max).
    No clamp to [-1, 1] is needed: values past the outermost midpoints land in the end buckets anyway.
    """
    step = max(1, _CHUNK // block_size)

    def work(begin: int, end: int) -> None:
        codes_buf = torch.empty(step * block_size, dtype=torch.uint8, device=flat.device)
        flags_buf = torch.empty(step * block_size, dtype=torch.bool, device=flat.device)
        for first in range(begin, end, step):
            last = min(first + step, end)
            count = (last - first) * block_size
            blocks = flat[first * block_size : last * block_size].view(-1, block_size)
            owned = blocks.dtype != torch.float32
            if owned:
                blocks = blocks.float()  # a fresh copy we may overwrite in place
            lo, hi = torch.aminmax(blocks, dim=1)  # max(-min, max) == max|w| exactly, without a |w| temporary
            block_max = torch.maximum(hi, lo.neg_()).abs_()  # abs_: a block of -0.0 gives +0.0, not -0.0
            absmax[first:last] = block_max
            scale = block_max.clamp_(min=1e-38).reciprocal_().unsqueeze(1)
            scaled = blocks.mul_(scale) if owned else blocks * scale
            codes = _codes_from_scaled(scaled.view(-1), bounds, order, codes_buf[:count], flags_buf[:count])
            pairs = codes.view(-1, 2)
            torch.bitwise_or(pairs[:, 0] << 4, pairs[:, 1],
                             out=packed[first * block_size // 2 : last * block_size // 2])

    if flat.device.type == "cpu":
        over_block_ranges(absmax.numel(), work)
    else:
        work(0, absmax.numel())


def _quantize_4bit_blocks(flat: torch.Tensor, quant_type: QuantType,
                          block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 of ceil(n/2) bytes, fp32 absmax per block) of a 1-D tensor, bnb-CPU bit for bit."""
    midpoints, order = _bounds(quant_type)
    bounds = midpoints.tolist()
    sort_to_code = None if quant_type == "nf4" else order  # NF4's codes are already sorted
    n = flat.numel()
    full = n - n % block_size
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=flat.device)
    _quantize_full_blocks(flat, block_size, bounds, sort_to_code, packed, absmax[: full // block_size])
    if full < n:  # short last block: bnb's CPU kernel divides by its absmax instead of multiplying by 1/absmax,
        tail = flat[full:].float()  # and stores the clamped absmax it divided by (1e-38 for an all-zero tail)
        tail_max = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = tail_max
        scaled = tail / tail_max
        if scaled.numel() % 2:
            scaled = torch.cat([scaled, scaled.new_zeros(1)])
        codes = _codes_from_scaled(scaled, bounds, sort_to_code, torch.empty_like(scaled, dtype=torch.uint8),
                                   torch.empty_like(scaled, dtype=torch.bool)).view(-1, 2)
        packed[full // 2 :] = (codes[:, 0] << 4) | codes[:, 1]
    return packed, absmax


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: QuantType = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    name: str = "tensor",
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` blockwise to 4 bits. Returns (packed uint8 of shape (ceil(n/2), 1), state).

    Raises ValueError naming ``name`` for NaN/Inf values, TypeError for non-float dtypes.
    """
    check_block_size(block_size)
    code = codebook(quant_type)  # an unknown quant_type fails here, first
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cannot quantize {name}: dtype {weight.dtype} is not float32/float16/bfloat16")
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize {name}: it is empty")
    flat = weight.detach().reshape(-1)
    cuda_kernel = flat.device.type == "cuda" and quant_type != "int4"  # bnb's CUDA arithmetic (quant_cuda.py)
    blocks = quant_cuda.quantize_4bit_blocks if cuda_kernel else _quantize_4bit_blocks
    packed, absmax = blocks(flat, quant_type, block_size)
    if not bool(torch.isfinite(absmax).all()):  # a NaN/Inf anywhere makes its block's absmax NaN/Inf
        bad = int((~torch.isfinite(absmax)).sum())
        raise ValueError(f"cannot quantize {name}: NaN/Inf values in {bad} of {absmax.numel()} blocks; "
                         "fix the weights or skip this tensor")
    state = QuantState(quant_type, block_size, tuple(weight.shape), weight.dtype, absmax, code.to(flat.device))
    if double_quant:
        state.offset = absmax.mean()
        state.nested_code = dynamic_map_signed().to(flat.device)
        quantize_8bit = quant_cuda.quantize_8bit_blocks if cuda_kernel else quantize_8bit_blockwise
        state.absmax, state.nested_absmax = quantize_8bit(absmax - state.offset, state.nested_code, NESTED_BLOCK_SIZE)
    return packed.unsqueeze(1), state


_LUT_SIZE = 65536
_LUTS: dict[tuple[float, ...], torch.Tensor] = {}


def _nearest_code_lut(code: torch.Tensor) -> torch.Tensor:
    """65536-bin table over [-1, 1]: bin i (value -1 + 2i/65535) -> index of the nearest sorted code.

    bitsandbytes' CPU 8-bit quantizer looks codes up this way instead of searching exactly, so the
    nested absmax codes only match bnb bit for bit if we discretize identically.
    """
    key = tuple(code.tolist())
    if key not in _LUTS:
        midpoints = (code[:-1] + code[1:]) * 0.5
        grid = (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1) + (-1.0)
        _LUTS[key] = torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)
    return _LUTS[key]


def quantize_8bit_blockwise(
    values: torch.Tensor, code: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values -> (uint8 code indices, fp32 absmax per block), bnb's 8-bit blockwise scheme.

    Per block: ``s = clamp(v * (1/absmax), -1, 1)``, bin ``trunc((s+1)*0.5*65535 + 0.5)``, code = LUT[bin];
    an all-zero block stores code 0. ``code`` must be sorted ascending (the dynamic map is).
    """
    flat = values.float().reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // block_size)
    blocks = torch.cat([flat, flat.new_zeros(n_blocks * block_size - n)]).view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # all-zero block: no 0*inf
    scaled = (blocks * inverse.unsqueeze(1)).clamp_(-1.0, 1.0)
    bins = ((scaled + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = _nearest_code_lut(code).to(bins.device)[bins]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].contiguous(), absmax
