"""Blockwise 4-bit quantization against bitsandbytes 0.50.x (CPU) as the oracle: identical bytes and scales.

Dequantization is checked against bnb's CPU kernel where that kernel is correct (row length a
multiple of the block size, or odd rows that take bnb's generic path) and otherwise against an
explicit float64 formula ``code[q] * absmax`` over bnb's own bytes (bnb 0.50.2's CPU dequant kernel
mis-assigns blocks when a row is not a multiple of the block size; see test below).
"""

from __future__ import annotations

import math

import pytest
import torch

from loralab.core import bnb_format as BF
from loralab.core import dequant as DQ
from loralab.core import native
from loralab.core import quant as Q
from loralab.core import quant_state as QS

F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64,), (33, 7), (3,), (257, 131), (128, 128), (1000,), (2, 4096)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["native", "torch"])
def decode(request):
    """Run a dequantize test through the native kernel and through the pure-torch decode."""
    if request.param == "torch":
        with native.disabled():
            yield "torch"
    elif native.library() is None:
        pytest.skip(f"native decode {native.status()}")
    else:
        yield "native"


def _weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3).to(dtype)


def _reference_dequant(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, bs: int):
    """float64 formula: nibble order high-then-low, value = code[q] * absmax[i // bs]."""
    data = packed.reshape(-1).long()
    q = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:n]
    scale = absmax.double().repeat_interleave(bs)[:n]
    return code.double()[q] * scale


def test_codebooks_and_dynamic_map_equal_bnb():
    """Bit for bit (torch.equal calls -0.0 equal to +0.0): before the fix FP4's code 8 was -0.0 where bnb's
    quant_map (saved in every checkpoint) and its CPU decode have +0.0."""
    for quant_type in ("nf4", "fp4"):
        assert _bits(QS.codebook(quant_type)) == _bits(F.get_4bit_type(quant_type, device="cpu")), quant_type
    assert QS.codebook("nf4")[7] == 0.0  # NF4's exact zero
    assert _bits(QS.dynamic_map_signed()) == _bits(F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_and_absmax_bit_exact_with_bnb(quant_type, dtype):
    for i, shape in enumerate(SHAPES):
        for block_size in (32, 64, 256, 4096):
            w = _weights(shape, dtype, seed=i * 7 + block_size)
            ref_packed, ref_state = F.quantize_4bit(w, blocksize=block_size, quant_type=quant_type)
            packed, state = Q.quantize_4bit(w, quant_type, block_size)
            assert packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
            assert torch.equal(packed, ref_packed), (shape, block_size)
            assert torch.equal(state.absmax, ref_state.absmax), (shape, block_size)


def test_ties_on_midpoints_go_to_lower_code_like_bnb():
    """Values exactly on a midpoint between codes (and +-0 for FP4) are where rounding rules differ."""
    for quant_type in ("nf4", "fp4"):
        mids, _ = Q._bounds(quant_type)
        values = torch.cat([mids, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0)),
                            torch.tensor([0.0, -0.0, 1e-9, -1e-9])])
        w = torch.cat([torch.tensor([1.0]), values, torch.zeros(64 - 1 - values.numel() % 64)])
        w = torch.cat([w, torch.ones(64 - w.numel() % 64)]) if w.numel() % 64 else w
        ref_packed, _ = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        packed, _ = Q.quantize_4bit(w, quant_type, 64)
        assert torch.equal(packed, ref_packed), quant_type


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_state_equals_bnb(dtype):
    for i, shape in enumerate([(64, 64), (300, 77), (4096, 17), (5,)]):
        w = _weights(shape, dtype, seed=100 + i)
        ref_packed, ref = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        packed, state = Q.quantize_4bit(w, "nf4", 64, double_quant=True)
        assert torch.equal(packed, ref_packed)
        assert state.absmax.dtype == torch.uint8 and torch.equal(state.absmax, ref.absmax)
        assert torch.equal(state.offset, ref.offset)
        assert torch.equal(state.nested_absmax, ref.state2.absmax)
        assert torch.equal(state.nested_code, ref.state2.code)
        ref_absmax = F.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
        assert torch.equal(DQ.dequantize_absmax(state), ref_absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_equals_bnb_cpu_kernel(quant_type, double_quant, dtype, decode):
    for i, shape in enumerate([(128, 128), (64, 256), (33, 7), (257, 131)]):  # rows % 64 == 0 or odd rows
        w = _weights(shape, dtype, seed=200 + i)
        ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                compress_statistics=double_quant)
        packed, state = Q.quantize_4bit(w, quant_type, 64, double_quant)
        ref = F.dequantize_4bit(ref_packed, ref_state)
        out = DQ.dequantize_4bit(packed, state)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, ref.reshape(w.shape)), shape


def test_dequantize_matches_formula_where_bnb_cpu_kernel_is_wrong(decode):
    w = _weights((128, 96), torch.float32, seed=3)  # 96-element rows straddle 64-element blocks
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    packed, state = Q.quantize_4bit(w, "nf4", 64)
    formula = _reference_dequant(ref_packed, ref_state.absmax, ref_state.code, w.numel(), 64).reshape(w.shape)
    out = DQ.dequantize_4bit(packed, state)
    torch.testing.assert_close(out.double(), formula, rtol=0, atol=1e-6)
    assert (out - w).abs().max() <= ref_state.absmax.max() * 0.2  # error bounded by the widest NF4 gap
    bnb_cpu = F.dequantize_4bit(ref_packed, ref_state)
    assert (bnb_cpu - w).abs().max() > (out - w).abs().max()  # documents bnb's kernel bug, not ours


def test_int4_is_symmetric_round_to_nearest():
    w = _weights((16, 64), torch.float32, seed=5)
    packed, state = Q.quantize_4bit(w, "int4", 64)
    out = DQ.dequantize_4bit(packed, state).double()
    absmax = w.abs().reshape(-1, 64).amax(1).double().repeat_interleave(64).reshape(w.shape)
    expected = torch.round(w.double() / absmax * 7) / 7 * absmax  # ties are measure-zero for random data
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_quantization_error_ordering_nf4_best_on_normal_weights():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    errors = {}
    for qt in ("nf4", "fp4", "int4"):
        packed, state = Q.quantize_4bit(w, qt, 64)
        errors[qt] = float((DQ.dequantize_4bit(packed, state) - w).pow(2).mean())
    assert errors["nf4"] < errors["fp4"] and errors["nf4"] < errors["int4"], errors


def test_bits_per_param_with_and_without_double_quant():
    w = torch.randn(1024, 1024)
    packed, state = Q.quantize_4bit(w, "nf4", 64, double_quant=False)
    assert QS.bits_per_param(packed, state) == pytest.approx(4 + 32 / 64)
    packed, state = Q.quantize_4bit(w, "nf4", 64, double_quant=True)
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel()  # + one fp32 offset per tensor
    assert QS.bits_per_param(packed, state) == pytest.approx(expected)
    assert round(QS.bits_per_param(packed, state), 3) == 4.127


def test_bnb_serialized_dict_round_trip_and_matches_bnb_as_dict():
    w = torch.randn(64, 96)
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = Q.quantize_4bit(w, "nf4", 64, double_quant=True)
    ours = BF.state_to_bnb_dict(state)
    theirs = ref_state.as_dict(packed=True)
    assert set(ours) == set(theirs)
    for key in ours:
        if "quant_state" in key:
            from bitsandbytes.utils import unpack_tensor_to_dict
            a, b = unpack_tensor_to_dict(ours[key]), unpack_tensor_to_dict(theirs[key])
            assert {k: a[k] for k in a if k != "shape"} == {k: b[k] for k in b if k != "shape"}
            assert list(a["shape"]) == list(b["shape"])
        else:
            assert torch.equal(ours[key], theirs[key]), key
    back = BF.state_from_bnb_dict(dict(theirs), "layer.weight")
    assert torch.equal(DQ.dequantize_4bit(ref_packed, back), DQ.dequantize_4bit(packed, state))


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(64, 64)
    for bad in (0, 16, 48, 100, 8192):
        with pytest.raises(ValueError, match="power of two in \\[32, 4096\\]"):
            Q.quantize_4bit(w, "nf4", bad)
    with pytest.raises(ValueError, match="quant_type"):
        Q.quantize_4bit(w, "nf3", 64)
    with pytest.raises(TypeError, match="my.weight.*int64"):
        Q.quantize_4bit(torch.ones(64, 64, dtype=torch.int64), name="my.weight")
    for value in (math.nan, math.inf, -math.inf):
        w_bad = w.clone()
        w_bad[3, 5] = value
        with pytest.raises(ValueError, match="layers.0.q_proj.weight.*NaN/Inf"):
            Q.quantize_4bit(w_bad, name="layers.0.q_proj.weight")
    w_tail = torch.randn(65)
    w_tail[-1] = math.nan  # NaN in the short last block
    with pytest.raises(ValueError, match="NaN/Inf"):
        Q.quantize_4bit(w_tail, name="t")


def test_inconsistent_serialized_state_names_the_tensor():
    packed, state = Q.quantize_4bit(torch.randn(64, 64), "nf4", 64, double_quant=True)
    good = BF.state_to_bnb_dict(state)
    missing = {k: v for k, v in good.items() if k != "nested_absmax"}
    with pytest.raises(ValueError, match="mlp.up_proj.weight.nested_absmax"):
        BF.state_from_bnb_dict(missing, "mlp.up_proj.weight")
    with pytest.raises(ValueError, match="mlp.up_proj.weight.absmax is missing"):
        BF.state_from_bnb_dict({k: v for k, v in good.items() if k != "absmax"}, "mlp.up_proj.weight")
    wrong = dict(good, absmax=good["absmax"][:-1])
    with pytest.raises(ValueError, match=r"mlp.up_proj.weight.absmax: expected uint8 of shape \(64,\) .* "
                                         r"found uint8 of shape \(63,\)"):
        BF.state_from_bnb_dict(wrong, "mlp.up_proj.weight")
    with pytest.raises(ValueError, match="quant_state.bitsandbytes__nf4"):
        BF.state_from_bnb_dict({k: v for k, v in good.items() if "quant_state" not in k}, "mlp.up_proj.weight")
    with pytest.raises(ValueError, match="x.weight: packed 4-bit weight has 2047 bytes, expected 2048"):
        QS.check_packed(packed[:-1], state, "x.weight")


def test_large_tensor_threaded_path_bit_exact_with_bnb(decode):
    """>= 2M elements runs the block ranges in parallel worker threads; results must not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = _weights((1000, 2112), torch.bfloat16, seed=11)  # 2112 = 33 blocks per row
        ref_packed, ref = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        packed, state = Q.quantize_4bit(w, "nf4", 64, double_quant=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert torch.equal(state.nested_absmax, ref.state2.absmax)
    assert torch.equal(DQ.dequantize_4bit(packed, state), F.dequantize_4bit(ref_packed, ref))


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("huge_pages", [True, False])
def test_large_dequantize_steps_tail_and_huge_page_hint_are_bitwise_exact(out_dtype, huge_pages, monkeypatch, decode):
    """Several 2^19-element steps, a short last block, the huge-page output hint on and off: every bit
    (signed zeros included) equals the formula ``code[q] * absmax`` in fp32, rounded once to the dtype."""
    monkeypatch.setattr(DQ, "HUGE_PAGE_OUTPUT", huge_pages)
    w = _weights((2_100_003,), torch.float32, seed=12)  # 8.4 MB of fp32 output: the hint applies
    w[:64] = 0.0  # an all-zero block
    w[64:128] = -torch.rand(64, generator=torch.Generator().manual_seed(5)) * 1e-3  # -0.0 products in FP4
    for quant_type in ("nf4", "fp4"):
        packed, state = Q.quantize_4bit(w, quant_type, 64, double_quant=True)
        absmax = DQ.dequantize_absmax(state)
        expected = _reference_dequant(packed, absmax, state.code, w.numel(), 64).float().to(out_dtype)
        out = DQ.dequantize_4bit(packed, state, out_dtype)
        bits = torch.int32 if out_dtype == torch.float32 else torch.int16
        assert out.dtype == out_dtype and out.shape == w.shape
        assert torch.equal(out.view(bits), expected.view(bits)), quant_type


def _bits(t: torch.Tensor) -> list[int]:
    """fp32 values as their bit patterns: tells +0.0 from -0.0 and 1e-38 from 0 (torch.equal does not)."""
    return t.float().contiguous().view(torch.int32).tolist()


def _zero_block_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(4, 64, generator=g)
    rows[1], rows[3] = 0.0, -0.0  # whole zero blocks, one of them -0.0
    tail = torch.randn(100, generator=g)
    tail[64:] = 0.0  # an all-zero short last block
    neg_tail = tail.clone()
    neg_tail[64:] = -0.0
    tiny_tail = torch.randn(70, generator=g)
    tiny_tail[64:] = 1e-40  # subnormal short last block: below bnb's 1e-38 clamp
    return {"zero rows": rows, "zero tail": tail, "-0 tail": neg_tail, "subnormal tail": tiny_tail,
            "1x1 zero": torch.zeros(1, 1), "1x1 -0": -torch.zeros(1, 1), "1x3 zero": torch.zeros(1, 3),
            "2x64 zero": torch.zeros(2, 64)}


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", list(_zero_block_cases()))
def test_all_zero_blocks_and_1x1_zero_tensor_match_bnb_bit_for_bit(case, quant_type, double_quant):
    """bnb stores +0.0 for a whole zero block and clamps the short last block's absmax to 1e-38 (so a 1x1
    zero tensor's double-quant offset is 1e-38). Before the fix: -0.0, 0.0 and offset 0.0 here."""
    w = _zero_block_cases()[case]
    ref_packed, ref = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    packed, state = Q.quantize_4bit(w, quant_type, 64, double_quant)
    assert torch.equal(packed, ref_packed)
    if double_quant:
        assert torch.equal(state.absmax, ref.absmax)
        assert _bits(state.offset.reshape(1)) == _bits(ref.offset.reshape(1))
        assert _bits(state.nested_absmax) == _bits(ref.state2.absmax)
    else:
        assert _bits(state.absmax) == _bits(ref.absmax)
    ours = DQ.dequantize_4bit(packed, state).reshape(-1)
    if w.shape[-1] % 64 == 0 or w.shape[-1] % 2:  # where bnb's CPU decode is right (see the module doc)
        assert _bits(ours) == _bits(F.dequantize_4bit(ref_packed, ref).reshape(-1))
    absmax = (F.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset) if double_quant else ref.absmax
    formula = _reference_dequant(ref_packed, absmax, ref.code, w.numel(), 64)  # bnb's own state, in float64
    assert _bits(ours) == _bits(formula)
    assert bool((ours[w.reshape(-1) == 0] == 0).all())


def _state_dict_of(w: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    return BF.state_to_bnb_dict(Q.quantize_4bit(w, "nf4", 64, double_quant)[1])


@pytest.mark.parametrize("field, corrupt, message", [
    ("absmax", lambda t: t.to(torch.bfloat16), r"absmax: expected float32 of shape \(128,\) .*found bfloat16 of shape \(128,\)"),
    ("absmax", lambda t: t.to(torch.bfloat16).view(2, 64).t(), r"absmax: .*found bfloat16 of shape \(64, 2\)\. This is the layout"),
    ("absmax", lambda t: torch.where(torch.arange(128) == 7, -t, t), r"absmax: 1 of 128 values are NaN/Inf or negative"),
    ("absmax", lambda t: torch.where(torch.arange(128) == 7, torch.nan, t), r"absmax: 1 of 128 values are NaN/Inf"),
    ("quant_map", lambda t: t[:15], r"quant_map: expected float32 of shape \(16,\)"),
    ("quant_map", lambda t: t.to(torch.bfloat16), r"quant_map: expected float32 .*found bfloat16"),
])
def test_corrupt_plain_state_is_refused_naming_tensor_expected_and_found(field, corrupt, message):
    entries = _state_dict_of(torch.randn(64, 128), double_quant=False)
    entries[field] = corrupt(entries[field])
    with pytest.raises(ValueError, match=r"^layers.0.down_proj.weight\." + message):
        BF.state_from_bnb_dict(entries, "layers.0.down_proj.weight")


@pytest.mark.parametrize("field, corrupt, message", [
    ("absmax", lambda t: t.float(), r"absmax: expected uint8 of shape \(128,\) .*found float32"),
    ("nested_absmax", lambda t: t.repeat(2), r"nested_absmax: expected float32 of shape \(1,\) .*found float32 of shape \(2,\)"),
    ("nested_absmax", lambda t: t * torch.inf, r"nested_absmax: 1 of 1 values are NaN/Inf"),
    ("nested_quant_map", lambda t: t[:255], r"nested_quant_map: expected float32 of shape \(256,\)"),
])
def test_corrupt_double_quant_state_is_refused(field, corrupt, message):
    entries = _state_dict_of(torch.randn(64, 128), double_quant=True)
    entries[field] = corrupt(entries[field])
    with pytest.raises(ValueError, match=r"^w\." + message):
        BF.state_from_bnb_dict(entries, "w")


def test_packed_weight_of_another_storage_dtype_is_refused():
    """bnb_4bit_quant_storage=bfloat16 stores the same bytes viewed as bf16; casting them (what .to(uint8)
    did) would scramble every code."""
    packed, state = Q.quantize_4bit(torch.randn(64, 64), "nf4", 64)
    with pytest.raises(ValueError, match="x.weight: packed 4-bit weight is torch.bfloat16, expected uint8"):
        QS.check_packed(packed.reshape(-1).view(torch.bfloat16), state, "x.weight")
