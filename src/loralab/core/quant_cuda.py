"""bitsandbytes' *CUDA* quantization arithmetic, used for tensors on a GPU.

bnb's CPU and CUDA kernels do not give the same bytes, so loralab follows the kernel of the device the
tensor is on: quant.py reproduces the CPU kernel, this module the CUDA one (bnb 0.50.x
``kQuantizeBlockwise`` with ``dQuantizeNF4`` / ``dQuantizeFP4`` / ``dQuantize<0>``). The differences:

- Scaling. Every block, the short last one too, is scaled as ``s = w * r`` with ``r = 1/absmax`` from
  the GPU's fast reciprocal (bnb is built with ``--use_fast_math``: ``rcp.approx.ftz.f32``, within 1 ulp
  of 1/absmax; reproduced through torch's jiterator where it is available, else the IEEE reciprocal).
  The CPU kernel divides the short block. An all-zero block gives ``0 * inf = NaN``: code 0.
- NF4. ``q = #{t_k < s}`` over bnb's 15 decision-tree thresholds (float literals, ``NF4_THRESHOLDS``).
- FP4. Sign bit from ``s < 0``, then the magnitude against 7 thresholds (``FP4_THRESHOLDS``), so a tiny
  negative value is stored as -0 (code 8); the CPU kernel picks the nearest of the signed codes.
- 8-bit (double quantization of the absmax). The exact nearest of the 256 sorted codes by bnb's binary
  search, a tie going to the last pivot; the CPU kernel looks codes up in a 65536-bin table.

Values that differ from bnb's CUDA kernel: a product ``w * r`` that is subnormal (|w| < 1.2e-38 |absmax|)
is flushed to zero there and kept here, which can change only a tiny negative FP4 value's sign bit.
"""

from __future__ import annotations

import torch

# bnb's dQuantizeNF4 decision tree, flattened: the code is the number of thresholds strictly below s.
NF4_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)
# dQuantizeFP4 on |s|: thresholds divide the magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12 (/ 12), whose bit
# patterns (without the sign bit 0b1000) are FP4_MAGNITUDE_BITS.
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_MAGNITUDE_BITS = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)

_RCP_SOURCE = """
template <typename T> T fast_reciprocal(T x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
"""
_rcp_fn = None  # the jiterator function; False once it failed


def reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """1/absmax as bnb's CUDA kernel computes it: the fast approximate reciprocal on a GPU (IEEE elsewhere,
    or where torch cannot compile the one-line kernel)."""
    global _rcp_fn
    absmax = absmax.float()
    if absmax.device.type == "cuda" and _rcp_fn is not False:
        try:
            if _rcp_fn is None:
                _rcp_fn = torch.cuda.jiterator._create_jit_fn(_RCP_SOURCE)
            return _rcp_fn(absmax)
        except Exception:  # no NVRTC / jiterator on this build: the IEEE reciprocal is within 1 ulp
            _rcp_fn = False
    return torch.reciprocal(absmax)


def _count_below(s: torch.Tensor, thresholds: tuple[float, ...]) -> torch.Tensor:
    """uint8 #{t in thresholds : t < s}, thresholds as fp32 literals (NaN counts none)."""
    out = torch.zeros(s.shape, dtype=torch.uint8, device=s.device)
    for t in torch.tensor(thresholds, dtype=torch.float32).tolist():
        out += s > t
    return out


def codes_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """uint8 code index (0..15) of each fp32 scaled value, as dQuantizeNF4 / dQuantizeFP4 give it."""
    if quant_type == "nf4":
        return _count_below(scaled, NF4_THRESHOLDS)
    if quant_type == "fp4":
        bits = torch.tensor(FP4_MAGNITUDE_BITS, dtype=torch.uint8, device=scaled.device)
        magnitude = bits[_count_below(scaled.abs(), FP4_THRESHOLDS).long()]
        return magnitude | ((scaled < 0).to(torch.uint8) << 3)
    raise ValueError(f"bitsandbytes has no CUDA kernel for {quant_type!r}")


def _blocks(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 blocks padded with zeros as bnb's block load does, absmax per block, scaled values)."""
    n = flat.numel()
    n_blocks = -(-n // block_size)
    blocks = torch.zeros(n_blocks * block_size, dtype=torch.float32, device=flat.device)
    blocks[:n] = flat
    blocks = blocks.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    return blocks, absmax, blocks * reciprocal(absmax).unsqueeze(1)


def quantize_4bit_blocks(flat: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 of ceil(n/2) bytes, fp32 absmax per block) of a 1-D tensor, bnb-CUDA bit for bit."""
    _, absmax, scaled = _blocks(flat, block_size)
    n = flat.numel()
    # odd n: the pad value (0 * 1/absmax) fills the last low nibble, as bnb's zero-filled block load does
    codes = codes_4bit(scaled.view(-1)[: n + n % 2], quant_type).view(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def quantize_8bit_blocks(values: torch.Tensor, code: torch.Tensor,
                         block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 code indices, fp32 absmax per block): dQuantize<0>'s binary search over the 256 sorted codes.

    The search compares ``s > code[pivot]`` at pivots 127 +- 64, 32, ..., 1, remembering the last pivot
    below (``lower``) and above (``upper``); then ``s`` goes to the nearer neighbour of the final pivot,
    a tie to the pivot. The outer bounds start at -1 and 1 (code[0] and code[255] once never moved).
    """
    flat = values.float().reshape(-1)
    n = flat.numel()
    _, absmax, scaled = _blocks(flat, block_size)
    x = scaled.view(-1)[:n]
    code = code.float().to(x.device)
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        above = x > val
        lower_pivot = torch.where(above, pivot, lower_pivot)
        lower = torch.where(above, val, lower)
        upper_pivot = torch.where(above, upper_pivot, pivot)
        upper = torch.where(above, upper, val)
        pivot = pivot + torch.where(above, step, -step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > val
    go_up = above & (x > (upper + val) * 0.5)
    go_down = ~above & (x < (lower + val) * 0.5)
    q = torch.where(go_up, upper_pivot, torch.where(go_down, lower_pivot, pivot))
    return q.to(torch.uint8), absmax
