"""Blockwise 4-bit quantization (NF4, FP4, Int4) and double quantization, in plain torch.

A weight ``W`` is flattened and cut into blocks of ``block_size`` values (the last block may be short).
Per block ``b`` with ``absmax_b = max |w|`` each value is scaled to ``s = w * (1 / absmax_b)`` in [-1, 1]
and stored as the index of the nearest code of a 16-entry codebook ``c``:

    q = argmin_k |s - c_k|  =  order[ #{midpoints m : m < s} ]

where ``midpoints`` lie halfway between consecutive *sorted* codes and ``order`` maps sorted position
back to the code index (FP4 codes are stored in bit-pattern order, with both +0 and -0). Counting the
midpoints strictly below ``s`` equals ``bucketize(s, midpoints)``: a value exactly on a midpoint goes to
the lower code. That tie rule, the reciprocal-multiply for full blocks and the true division for a short
last block are what bitsandbytes' CPU path does, so packed bytes and absmax are bit-identical to
``bitsandbytes.functional.quantize_4bit`` (0.50.x) on the CPU. On a GPU, NF4/FP4 follow bnb's CUDA
kernel instead, whose arithmetic differs in places (quant_cuda.py). Two codes share a byte: element
``2i`` in the high nibble, element ``2i+1`` in the low nibble; the packed tensor has bnb's shape
``(ceil(n/2), 1)``.

Dequantization is ``w_hat = c[q] * absmax_b`` computed in fp32 and rounded once to the output dtype.

Double quantization (QLoRA): the fp32 absmax vector minus its mean ``offset`` is quantized to 8 bits
with the signed dynamic map in blocks of 256, each block with its own fp32 scale (nearest code through
bnb's 65536-bin lookup table, reproduced exactly; see ``quantize_8bit_blockwise``). Storage per
parameter with block 64: 4 + 8/64 + 32/(64*256) = 4.127 bits (vs 4.5 bits with plain fp32 absmax).
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from loralab.core import native, quant_cuda

QuantType = Literal["nf4", "fp4", "int4"]
QUANT_TYPES = ("nf4", "fp4", "int4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCK_SIZE = 256

# NormalFloat4 (QLoRA, Dettmers et al. 2023): quantiles of N(0,1) rescaled to [-1, 1] with an exact zero,
# 7 negative and 8 positive levels. These are the fp32 values bitsandbytes ships.
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bnb's bias), indexed by bit pattern, divided by its max 12.
_FP4_BITS = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]


def codebook(quant_type: QuantType) -> torch.Tensor:
    """The 16 fp32 code values indexed by the stored 4-bit pattern."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        magnitudes = torch.tensor(_FP4_BITS, dtype=torch.float32)
        return torch.cat([magnitudes, -magnitudes]) / 12.0
    if quant_type == "int4":
        # Symmetric integer levels k/7, k = -7..7 at index k+8; index 0 is a spare copy of -1.
        levels = (torch.arange(16, dtype=torch.float32) - 8) / 7
        levels[0] = -1.0
        return levels
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


_BOUNDS_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _bounds(quant_type: QuantType) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted codes, sorted position -> code index as uint8)."""
    if quant_type not in _BOUNDS_CACHE:
        code = codebook(quant_type)
        order = torch.argsort(code, stable=True)  # stable: +0 (index 0) sorts before -0 (index 8), as bnb
        ordered = code[order]
        _BOUNDS_CACHE[quant_type] = ((ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8))
    return _BOUNDS_CACHE[quant_type]


def dynamic_map_signed() -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (Dettmers 2015): sign, unary exponent 10^-e, linear fraction.

    For exponent e = 0..6, ``2**e + 1`` fraction boundaries linspace(0.1, 1) give ``2**e`` bin means,
    scaled by ``10**(e-6)`` and used with both signs; plus 0 and 1.0; 256 values sorted ascending.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (e - 6)  # multiplied in fp32 (as bnb does): the map equals bnb's bit for bit
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def check_block_size(block_size: int, name: str = "block_size") -> None:
    if not isinstance(block_size, int) or block_size < 32 or block_size > 4096 or block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096] (e.g. 64), got {block_size!r}")


def check_finite_float(tensor: torch.Tensor, name: str) -> None:
    """Raise a ValueError naming ``name`` if the tensor is not a float tensor or holds NaN/Inf."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cannot quantize {name}: dtype {tensor.dtype} is not float32/float16/bfloat16")
    if tensor.numel() == 0:
        raise ValueError(f"cannot quantize {name}: it is empty")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"cannot quantize {name}: {bad} NaN/Inf values; fix or skip this tensor")


@dataclass
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor (mirrors bnb's QuantState fields).

    Without double quant ``absmax`` is fp32 (one per block). With it, ``absmax`` is uint8 codes of
    ``absmax - offset`` in the dynamic map ``nested_code`` with fp32 scales ``nested_absmax`` per 256.
    """

    quant_type: str
    block_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


_CHUNK = 1 << 14  # quantize: elements per step, in cache and below torch's intra-op grain (ops run serially)
_DEQUANT_CHUNK = 1 << 19  # dequantize: output elements per step (2 MiB fp32 scratch); measured best of 2^15..2^20
_NATIVE_PER_WORKER = 1 << 20  # native dequantize: elements per Python thread (below ~2M values one thread wins)
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid that created it, pool)


def _over_block_ranges(n_blocks: int, work, block_size: int = 64, per_worker: int = 1 << 20) -> None:
    """Run ``work(first, last)`` over contiguous block ranges, one per torch thread, in Python threads.

    Small per-chunk ops run serially inside each range (torch releases the GIL in kernels), so there is
    one fork/join per call instead of one per op: on a loaded machine a per-op barrier waits for every
    descheduled worker, which made chunked intra-op parallelism 10-40x slower. A range gets at least
    ``per_worker`` elements: below that the fork/join costs more than it saves.
    """
    global _POOL
    workers = min(torch.get_num_threads(), max(1, n_blocks * block_size // per_worker))
    if workers <= 1:
        work(0, n_blocks)
        return
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1]._max_workers < workers:  # new after fork
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loralab-quant"))
    edges = [n_blocks * i // workers for i in range(workers + 1)]
    futures = [_POOL[1].submit(work, a, b) for a, b in zip(edges[:-2], edges[1:-1])]
    work(edges[-2], edges[-1])  # the calling thread takes the last range: one hand-off fewer
    for future in futures:
        future.result()


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

    Exact bnb arithmetic: ``s = w * (1 / max(absmax, 1e-38))`` in fp32, then the nearest code.
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
            block_max = torch.maximum(hi, lo.neg_())
            absmax[first:last] = block_max
            scale = block_max.clamp_(min=1e-38).reciprocal_().unsqueeze(1)
            scaled = blocks.mul_(scale) if owned else blocks * scale
            codes = _codes_from_scaled(scaled.view(-1), bounds, order, codes_buf[:count], flags_buf[:count])
            pairs = codes.view(-1, 2)
            torch.bitwise_or(pairs[:, 0] << 4, pairs[:, 1],
                             out=packed[first * block_size // 2 : last * block_size // 2])

    if flat.device.type == "cpu":
        _over_block_ranges(absmax.numel(), work)
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
    if full < n:  # short last block: bnb's CPU kernel divides by its absmax instead of multiplying by 1/absmax
        tail = flat[full:].float()
        tail_max = tail.abs().max()
        absmax[-1] = tail_max
        scaled = tail / tail_max.clamp(min=1e-38)
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


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 per-block scales: stored directly, or ``nested_code[q] * nested_absmax + offset``."""
    if not state.double_quant:
        return state.absmax.float()
    n = state.absmax.numel()
    values = torch.index_select(state.nested_code, 0, state.absmax.int())
    bs = state.nested_block_size
    full = n - n % bs
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    torch.mul(values[:full].view(-1, bs), state.nested_absmax[: full // bs].unsqueeze(1), out=out[:full].view(-1, bs))
    if full < n:
        torch.mul(values[full:], state.nested_absmax[-1], out=out[full:])
    return out.add_(state.offset)


# Output allocation. A large fresh CPU tensor is a new mmap, and first touch faults in every 4 KiB page;
# on this kind of (virtualized) machine that costs more than decoding (64 MiB: ~75 ms of faults vs ~25 ms
# of work). Asking the kernel for transparent huge pages on the output (madvise(MADV_HUGEPAGE), only
# honoured where THP is in "madvise" or "always" mode) cuts the faults ~4x. It is a hint: values are
# unaffected, and it is skipped off Linux, for small tensors, or with LORALAB_NO_HUGEPAGES=1.
HUGE_PAGE_OUTPUT = os.environ.get("LORALAB_NO_HUGEPAGES", "") in ("", "0")
_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise = None  # libc's madvise once looked up; False where unavailable


def _advise_huge_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_HUGEPAGE) on the 2 MiB-aligned pages inside ``tensor``'s memory (not yet touched)."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _madvise = libc.madvise
                _madvise.argtypes, _madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                _madvise = False
    if _madvise:
        begin = tensor.data_ptr()
        first = (begin + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        last = (begin + tensor.numel() * tensor.element_size()) & ~(_HUGE_PAGE - 1)
        if last > first:
            _madvise(first, last - first, _MADV_HUGEPAGE)  # an error (THP off) just leaves 4 KiB pages


def _empty_output(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype, device=device)
    if HUGE_PAGE_OUTPUT and device.type == "cpu" and n * out.element_size() >= 4 * _HUGE_PAGE:
        _advise_huge_pages(out)
    return out


_PAIR_TABLES: dict[tuple[float, ...], torch.Tensor] = {}


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64 view of a (256, 2) fp32 table: byte -> (code[high nibble], code[low nibble]).

    Gathering 8-byte words decodes two values per byte in one 1-D gather.
    """
    key = tuple(code.tolist())
    if key not in _PAIR_TABLES:
        byte = torch.arange(256)
        pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()
        _PAIR_TABLES[key] = pairs.view(torch.int64).view(256)
    return _PAIR_TABLES[key]


_DEVICE_TABLES: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _device_pair_table(code: torch.Tensor) -> torch.Tensor:
    """The pair table of a codebook on a GPU, built once per codebook tensor (building it reads the codes
    to the host: a device sync, which per call stalled every 4-bit matmul; measured on an H200)."""
    entry = _DEVICE_TABLES.get(id(code))
    if entry is not None and entry[0]() is code and entry[1] == code._version:
        return entry[2]
    if len(_DEVICE_TABLES) > 64:  # forget codebooks that no longer exist
        for key in [k for k, (ref, _, _) in _DEVICE_TABLES.items() if ref() is None]:
            del _DEVICE_TABLES[key]
    table = _pair_table(code.cpu()).to(code.device)
    _DEVICE_TABLES[id(code)] = (weakref.ref(code), code._version, table)
    return table


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed codes -> tensor of ``state.shape`` in ``dtype`` (default: the original dtype), written into
    ``out`` (a contiguous tensor of that many elements and dtype) when given.

    ``w_hat = code[q] * absmax_block`` in fp32, rounded once to ``dtype`` (bnb's CPU arithmetic).
    fp32 and bf16 on CPU use the C kernel of :mod:`loralab.core.native` when it could be built (~4x
    faster, bit-identical); everything else decodes in torch (:func:`_dequantize_blocks_torch`).
    """
    dtype = dtype or state.dtype
    n, bs = state.numel, state.block_size
    device = packed.device
    data = packed.reshape(-1).view(torch.uint8)
    if out is None:
        out = _empty_output(n, dtype, device)
    elif not (out.is_contiguous() and out.numel() == n and out.dtype == dtype and out.device == device):
        raise ValueError(f"dequantize_4bit: out must be a contiguous {dtype} tensor of {n} elements on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    out = out.view(-1)
    if native.dequantize_4bit(
            data, state, out, lambda n_blocks, work: _over_block_ranges(n_blocks, work, bs, _NATIVE_PER_WORKER)):
        return out.view(state.shape)
    absmax = dequantize_absmax(state)
    full = n - n % bs
    table = _pair_table(state.code.float()) if device.type == "cpu" else _device_pair_table(state.code.float())
    _dequantize_blocks_torch(data, table, absmax, full // bs, bs, out)
    if full < n:  # the partial last block
        values = torch.index_select(table, 0, data[full // 2 :].int()).view(torch.float32)[: n - full]
        torch.mul(values, absmax[-1], out=out[full:])
    return out.view(state.shape)


def _dequantize_blocks_torch(data: torch.Tensor, table: torch.Tensor, absmax: torch.Tensor, n_blocks: int,
                             bs: int, out: torch.Tensor) -> None:
    """The whole blocks in torch. Per step of blocks: bytes -> int32 indices, one gather of
    (code[hi], code[lo]) pairs from a 256-entry table into an fp32 scratch, one multiply by the block
    scales. fp32 multiplies straight into the output; other dtypes multiply in place and cast with one
    copy (an fp32 x fp32 -> bf16 ``out=`` multiply is ~5x slower in eager torch; the value is the same:
    the fp32 product rounded once). Gathering into the scratch, not the output, keeps its writes in cache.
    """
    step = max(1, _DEQUANT_CHUNK // bs if data.device.type == "cpu" else n_blocks)  # a GPU takes it in one go
    index_buf = torch.empty(min(step, n_blocks) * bs // 2, dtype=torch.int32, device=data.device)  # reused
    values_buf = torch.empty(min(step, n_blocks) * bs, dtype=torch.float32, device=data.device)  # stays in cache
    for first in range(0, n_blocks, step):  # ops of a step use torch's own intra-op threads
        last = min(first + step, n_blocks)
        count = (last - first) * bs
        index = index_buf[: count // 2].copy_(data[first * bs // 2 : last * bs // 2])
        values = torch.index_select(table, 0, index, out=values_buf[:count].view(torch.int64)).view(torch.float32)
        target = out[first * bs : last * bs].view(-1, bs)
        if out.dtype == torch.float32:
            torch.mul(values.view(-1, bs), absmax[first:last].unsqueeze(1), out=target)
        else:
            target.copy_(values.view(-1, bs).mul_(absmax[first:last].unsqueeze(1)))


def bits_per_param(packed: torch.Tensor, state: QuantState) -> float:
    """Storage bits per parameter from the real tensors: packed codes + scales (+ nested scales, offset).

    Codebooks are shared constants (16 / 256 values per model, not per tensor) and not counted.
    """
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.double_quant:
        nbytes += state.nested_absmax.numel() * state.nested_absmax.element_size()
        nbytes += state.offset.numel() * state.offset.element_size()
    return 8.0 * nbytes / state.numel


def check_packed(packed: torch.Tensor, state: QuantState, name: str) -> None:
    """The packed weight must hold exactly ceil(n/2) bytes for the state's shape."""
    want = (state.numel + 1) // 2
    if packed.numel() * packed.element_size() != want:
        raise ValueError(f"{name}: packed 4-bit weight has {packed.numel() * packed.element_size()} bytes, "
                         f"expected {want} for shape {state.shape}")


def __getattr__(name: str):
    """Backwards-compatible access: bnb's serialized state layout now lives in ``loralab.core.quant_io``."""
    if name in ("state_to_bnb_dict", "state_from_bnb_dict"):
        from loralab.core import quant_io

        return getattr(quant_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
