"""4-bit decode: packed codes + quant state -> weights, bit-identical with bitsandbytes' CPU arithmetic.

For block ``b`` of ``block_size`` values (quant_state.py describes the state)::

    absmax_b = nested_code[a_b] * nested_absmax[b // 256] + offset     (double-quantized, blocks of 256)
             = absmax[b]                                               (plain fp32)
    w_hat_i  = code[q_i] * absmax_(i // block_size)

each product computed in fp32 and rounded once to the output dtype. q_(2i) is the high nibble of byte i,
q_(2i+1) the low one. fp32 and bf16 on CPU use the C kernel of :mod:`loralab.core.native` when it could
be built (~4x faster, bit-identical); everything else decodes in torch (``_dequantize_blocks_torch``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref

import torch

from loralab.core import native
from loralab.core.parallel import over_block_ranges
from loralab.core.quant_state import QuantState

_DEQUANT_CHUNK = 1 << 19  # output elements per step (2 MiB fp32 scratch); measured best of 2^15..2^20
_NATIVE_PER_WORKER = 1 << 20  # native decode: elements per Python thread (below ~2M values one thread wins)


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
    ``out`` (a contiguous tensor of that many elements and dtype) when given."""
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
            data, state, out, lambda n_blocks, work: over_block_ranges(n_blocks, work, bs, _NATIVE_PER_WORKER)):
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
