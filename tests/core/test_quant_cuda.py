"""quant_cuda.py (bnb's CUDA quantization arithmetic) against scalar transcriptions of bnb's device
functions ``dQuantizeNF4``, ``dQuantizeFP4`` and ``dQuantize<0>`` (csrc/kernels.cu, 0.50.x), on the CPU.

The transcriptions below follow the kernels' nested ifs and binary search line by line in numpy float32;
the module under test flattens them into vectorized counts and ``where`` chains, so the two are
independent. On a GPU, tests/core/test_cuda.py compares against bnb's CUDA kernels themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loralab.core import quant_state as QS
from loralab.core import quant_cuda as QC

f32 = np.float32


def nf4_tree(x: f32) -> int:
    if x > f32(0.03979014977812767):
        if x > f32(0.3893125355243683):
            if x > f32(0.6427869200706482):
                return 0b1111 if x > f32(0.8614784181118011) else 0b1110
            return 0b1101 if x > f32(0.5016634166240692) else 0b1100
        if x > f32(0.2035212516784668):
            return 0b1011 if x > f32(0.2920137718319893) else 0b1010
        return 0b1001 if x > f32(0.1202552504837513) else 0b1000
    if x > f32(-0.33967943489551544):
        if x > f32(-0.13791173323988914):
            return 0b0111 if x > f32(-0.045525018125772476) else 0b0110
        return 0b0101 if x > f32(-0.23460740596055984) else 0b0100
    if x > f32(-0.6106329262256622):
        return 0b0011 if x > f32(-0.4599952697753906) else 0b0010
    return 0b0001 if x > f32(-0.8480964004993439) else 0b0000


def fp4_tree(x: f32) -> int:
    sign = 0b1000 if x < 0 else 0
    x = abs(x)
    if x > f32(0.29166667):
        if x > f32(0.583333):
            return (0b0011 if x > f32(0.8333333) else 0b0010) + sign
        return (0b101 if x > f32(0.4166667) else 0b100) + sign
    if x > f32(0.0859375):
        return (0b0111 if x > f32(0.20833333) else 0b0110) + sign
    return (0b0001 if x > f32(0.00260417) else 0b0000) + sign


def quantize_8bit_search(code: np.ndarray, x: f32) -> int:
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = f32(-1.0), f32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        return upper_pivot if x > (upper + val) * f32(0.5) else pivot
    return lower_pivot if x < (lower + val) * f32(0.5) else pivot


def _edge_values(thresholds) -> np.ndarray:
    """Every threshold exactly, one float32 ulp either side, their negatives, zeros, +-1, NaN, randoms."""
    t = np.array(thresholds, dtype=f32)
    vals = [t, np.nextafter(t, f32(2)), np.nextafter(t, f32(-2)),
            -t, np.nextafter(-t, f32(2)), np.nextafter(-t, f32(-2))]
    vals.append(np.array([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, np.nan], dtype=f32))
    vals.append(np.random.default_rng(0).uniform(-1, 1, 4000).astype(f32))
    return np.concatenate(vals)


@pytest.mark.parametrize("quant_type,tree,thresholds", [("nf4", nf4_tree, QC.NF4_THRESHOLDS),
                                                         ("fp4", fp4_tree, QC.FP4_THRESHOLDS)])
def test_4bit_codes_equal_the_kernel_decision_tree(quant_type, tree, thresholds):
    x = _edge_values(thresholds)
    got = QC.codes_4bit(torch.from_numpy(x), quant_type).tolist()
    want = [tree(v) for v in x]
    assert got == want
    assert fp4_tree(f32(-1e-30)) == 0b1000 and QC.codes_4bit(torch.tensor([-1e-30]), "fp4").item() == 8  # -0


def test_8bit_codes_equal_the_kernel_binary_search():
    code = QS.dynamic_map_signed().numpy()
    mids = (code[:-1] + code[1:]) * f32(0.5)
    x = np.concatenate([code, mids, np.nextafter(mids, f32(2)), np.nextafter(mids, f32(-2)),
                        np.random.default_rng(1).uniform(-1, 1, 5000).astype(f32)])
    # quantize_8bit_blocks scales by 1/absmax per block: one block of 1.0 pins the scale to exactly 1
    values = torch.from_numpy(np.concatenate([x, np.ones(1, dtype=f32)]))
    q, absmax = QC.quantize_8bit_blocks(values, torch.from_numpy(code), block_size=values.numel())
    assert absmax.tolist() == [1.0]
    assert q[:-1].tolist() == [quantize_8bit_search(code, v) for v in x]


def test_8bit_all_zero_block_gets_code_zero_and_blocks_scale_separately():
    code = QS.dynamic_map_signed()
    values = torch.cat([torch.zeros(256), torch.linspace(-3, 2, 256), torch.tensor([0.5, -0.25])])
    q, absmax = QC.quantize_8bit_blocks(values, code, block_size=256)
    assert absmax.tolist() == [0.0, 3.0, 0.5] and q.dtype == torch.uint8 and q.numel() == values.numel()
    assert q[:256].eq(0).all()  # 0 * (1/0) = NaN: the search ends at pivot 0
    c = code.numpy()
    scale = f32(1.0) / f32(3.0)
    want = [quantize_8bit_search(c, f32(v) * scale) for v in values[256:512].numpy()]
    assert q[256:512].tolist() == want
    assert q[512:].tolist() == [quantize_8bit_search(c, f32(0.5) * f32(2.0)), quantize_8bit_search(c, f32(-0.5))]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_blocks_scale_by_the_reciprocal_pad_with_zero_and_pack_high_nibble_first(quant_type):
    tree = nf4_tree if quant_type == "nf4" else fp4_tree
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64 * 3 + 7, generator=g)  # a short last block with an odd count
    w[64:128] = 0  # an all-zero block
    packed, absmax = QC.quantize_4bit_blocks(w, quant_type, 64)
    assert packed.numel() == (w.numel() + 1) // 2
    codes = []
    for b in range(4):
        block = w[64 * b: 64 * (b + 1)].numpy()
        amax = f32(np.abs(block).max())
        assert absmax[b].item() == amax
        r = f32(1.0) / amax if amax > 0 else f32(np.inf)
        with np.errstate(invalid="ignore"):
            codes += [tree(f32(v) * r) for v in block]
    codes.append(tree(f32(0.0) * (f32(1.0) / absmax[-1].numpy())))  # the pad value in the last low nibble
    want = [(hi << 4) | lo for hi, lo in zip(codes[0::2], codes[1::2])]
    assert packed.tolist() == want
    assert all(c == 0 for c in codes[64:128])  # all-zero block: NaN, code 0 (decodes to 0 * absmax 0 = 0)
