"""The 4-bit quant state: codebooks, the ``QuantState`` record, its invariants and storage cost.

A weight of ``n`` values is cut into ``ceil(n / block_size)`` blocks (block 64 by default; the last one
may be short). Block ``b`` keeps one scale ``absmax_b = max |w|`` and each value keeps a 4-bit index into
a 16-entry codebook ``c``; ``w_hat = c[q] * absmax_b``. Two indices share a byte (element ``2i`` in the
high nibble), so the packed tensor holds ``ceil(n/2)`` uint8, bnb's shape ``(ceil(n/2), 1)``.

Double quantization (QLoRA) stores the fp32 absmax vector as ``offset + nested_code[a] * s_k``: ``offset``
is its mean, ``a`` a uint8 index into the 256-value signed dynamic map, ``s_k`` one fp32 scale per block
of 256 absmax values. Storage per parameter with block 64: 4 + 8/64 + 32/(64*256) = 4.127 bits (4.5
bits with plain fp32 absmax).

This module only describes and checks states; quant.py builds them, dequant.py decodes them and
bnb_format.py reads and writes bitsandbytes' serialized form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

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
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bnb's bias), indexed by bit pattern, divided by its max 12;
# the pattern 0b1000 (sign bit alone) is +0.0 in bnb's table, not -0.0.
_FP4_BITS = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]


def codebook(quant_type: QuantType) -> torch.Tensor:
    """The 16 fp32 code values indexed by the stored 4-bit pattern."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        magnitudes = torch.tensor(_FP4_BITS, dtype=torch.float32)
        return torch.cat([magnitudes, -magnitudes]) / 12.0 + 0.0  # + 0.0 turns -0.0 into +0.0, as bnb
    if quant_type == "int4":
        # Symmetric integer levels k/7, k = -7..7 at index k+8; index 0 is a spare copy of -1.
        levels = (torch.arange(16, dtype=torch.float32) - 8) / 7
        levels[0] = -1.0
        return levels
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


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
        return math.prod(int(d) for d in self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)


def check_block_size(block_size: int, name: str = "block_size") -> None:
    if not isinstance(block_size, int) or block_size < 32 or block_size > 4096 or block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096] (e.g. 64), got {block_size!r}")


def check_finite_float(tensor: torch.Tensor, name: str) -> None:
    """Raise naming ``name`` if the tensor is not float32/16/bf16, is empty, or holds NaN/Inf."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cannot quantize {name}: dtype {tensor.dtype} is not float32/float16/bfloat16")
    if tensor.numel() == 0:
        raise ValueError(f"cannot quantize {name}: it is empty")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"cannot quantize {name}: {bad} NaN/Inf values; fix or skip this tensor")


def check_packed(packed: torch.Tensor, state: QuantState, name: str) -> None:
    """The packed weight must be uint8 holding exactly ceil(n/2) bytes for the state's shape."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"{name}: packed 4-bit weight is {packed.dtype}, expected uint8 (a checkpoint saved "
                         "with bnb_4bit_quant_storage other than uint8 is not supported; re-save with uint8)")
    want = (state.numel + 1) // 2
    if packed.numel() != want:
        raise ValueError(f"{name}: packed 4-bit weight has {packed.numel()} bytes, expected {want} "
                         f"for shape {state.shape}")


# bnb's CPU path, after an eval-mode forward, repacks a layer for its bf16 kernel and keeps absmax as a
# (blocks per row, out_features) bf16 tensor; transformers then saves that layout as if it were bnb's.
_REPACKED_HINT = (" This is the layout bitsandbytes' CPU kernel switches to after an eval-mode forward: absmax "
                  "rounded to bf16 and transposed to (blocks per row, out_features), saved as if it were the "
                  "serialized format. Re-save the checkpoint from a model that ran no eval-mode forward on CPU, "
                  "or re-quantize from full precision.")


def _expect(tensor: torch.Tensor | None, name: str, dtype: torch.dtype, shape: tuple[int, ...], why: str) -> None:
    if tensor is None:
        raise ValueError(f"{name} is missing ({why})")
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        hint = _REPACKED_HINT if name.endswith(".absmax") and tensor.dim() == 2 else ""
        raise ValueError(f"{name}: expected {str(dtype).removeprefix('torch.')} of shape {shape} ({why}), "
                         f"found {str(tensor.dtype).removeprefix('torch.')} of shape {tuple(tensor.shape)}.{hint}")


def _expect_finite(tensor: torch.Tensor, name: str, non_negative: bool = False) -> None:
    bad = ~torch.isfinite(tensor)
    if non_negative:
        bad |= tensor < 0
    if bool(bad.any()):
        what = "NaN/Inf or negative" if non_negative else "NaN/Inf"
        raise ValueError(f"{name}: {int(bad.sum())} of {tensor.numel()} values are {what}; the file is corrupt")


def validate_state(state: QuantState, name: str) -> None:
    """Check every invariant the decoders rely on, so a corrupt state fails here, naming the tensor, the
    shape and dtype expected and found, instead of as a shape error (or wrong numbers) in a forward.

    ``name`` is the weight's name (``model.layers.0.mlp.up_proj.weight``); companions are ``name.absmax`` etc.
    """
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: quant_type {state.quant_type!r} is not one of {QUANT_TYPES}")
    check_block_size(state.block_size, f"{name} blocksize")
    if state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: original dtype {state.dtype} is not float32/float16/bfloat16")
    if not state.shape or any(int(d) < 1 for d in state.shape):
        raise ValueError(f"{name}: shape {tuple(state.shape)} has no elements")
    n_blocks = state.n_blocks
    per_block = f"one per block of {state.block_size} of shape {tuple(state.shape)}"
    _expect(state.code, f"{name}.quant_map", torch.float32, (16,), "the 16 codebook values")
    _expect_finite(state.code, f"{name}.quant_map")
    if not state.double_quant:
        _expect(state.absmax, f"{name}.absmax", torch.float32, (n_blocks,), per_block)
        _expect_finite(state.absmax, f"{name}.absmax", non_negative=True)
        return
    _expect(state.absmax, f"{name}.absmax", torch.uint8, (n_blocks,), f"{per_block}, double-quantized codes")
    if not isinstance(state.nested_block_size, int) or state.nested_block_size < 1:
        raise ValueError(f"{name}: nested blocksize {state.nested_block_size!r} is not a positive integer")
    n_nested = -(-n_blocks // state.nested_block_size)
    _expect(state.nested_absmax, f"{name}.nested_absmax", torch.float32, (n_nested,),
            f"one per {state.nested_block_size} absmax values")
    _expect_finite(state.nested_absmax, f"{name}.nested_absmax", non_negative=True)
    _expect(state.nested_code, f"{name}.nested_quant_map", torch.float32, (256,), "the 8-bit dynamic map")
    _expect_finite(state.nested_code, f"{name}.nested_quant_map")
    if state.offset is None or state.offset.numel() != 1 or not bool(torch.isfinite(state.offset).all()):
        raise ValueError(f"{name}: nested_offset must be one finite number, got {state.offset!r}")


def bits_per_param(packed: torch.Tensor, state: QuantState) -> float:
    """Storage bits per parameter from the real tensors: packed codes + scales (+ nested scales, offset).

    Codebooks are shared constants (16 / 256 values per model, not per tensor) and not counted.
    """
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.double_quant:
        nbytes += state.nested_absmax.numel() * state.nested_absmax.element_size()
        nbytes += state.offset.numel() * state.offset.element_size()
    return 8.0 * nbytes / state.numel
