"""The native 4-bit decode (loralab.core.native): built here, bit-identical to the pure-torch decode on
every path (AVX2 and scalar loops, partial last blocks, thread-split ranges), and a clean fallback."""

from __future__ import annotations

import pytest
import torch

from loralab.core import dequant as DQ
from loralab.core import native
from loralab.core import quant as Q
from loralab.core.linear4bit import Linear4bit
from loralab.core.lora import LoraLinear

HAVE_CC = native._compiler() is not None


def _decode_both(packed, state, dtype=torch.float32):
    with native.disabled():
        reference = DQ.dequantize_4bit(packed, state, dtype)
    return DQ.dequantize_4bit(packed, state, dtype), reference


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine: the pure-torch decode is used")
def test_kernel_builds_and_is_cached(tmp_path, monkeypatch):
    assert native.status() in ("avx2", "scalar")
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    native._build()
    built = list((tmp_path / "native").glob("libloralab_native-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._build()  # same source, compiler and machine: the cached library, not a new build
    assert [p.stat().st_mtime_ns for p in (tmp_path / "native").iterdir()] == [stamp]


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_torch_decode(simd, quant_type, double_quant, dtype, monkeypatch):
    monkeypatch.setattr(native, "SIMD", simd)
    g = torch.Generator().manual_seed(0)
    for shape, block in [((576, 576), 64), ((7, 13), 64), ((3, 321), 32), ((1,), 64), ((130, 1000), 256),
                         ((5, 4096 + 17), 4096)]:
        w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3
        w.view(-1)[: min(64, w.numel())] = 0.0  # an all-zero block (and -0.0 products in FP4)
        packed, state = Q.quantize_4bit(w, quant_type, block, double_quant)
        fast, reference = _decode_both(packed, state, dtype)
        bits = torch.int32 if dtype == torch.float32 else torch.int16  # every bit, signed zeros included
        assert fast.dtype == dtype and torch.equal(fast.view(bits), reference.view(bits)), (shape, block)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
def test_thread_split_ranges_bit_identical():
    """>= 2M values: block ranges run in two threads, the last range ends in a partial block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(2_100_003, generator=torch.Generator().manual_seed(1))
        packed, state = Q.quantize_4bit(w, "nf4", 64, double_quant=True)
        fast, reference = _decode_both(packed, state)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fast, reference)


def test_fp16_output_takes_the_torch_path():
    w = torch.randn(64, 96)
    packed, state = Q.quantize_4bit(w, "nf4", 64, True)
    out = torch.empty(64 * 96, dtype=torch.float16)
    assert not native.dequantize_4bit(packed.view(-1), state, out, lambda n, work: work(0, n))
    fast, reference = _decode_both(packed, state, torch.float16)
    assert torch.equal(fast, reference)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LORALAB_NATIVE", "0")
    assert native.status() == "disabled" and native.library() is None


def test_no_compiler_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_STATE", {"lib": None, "tried": False, "reason": "not built yet", "off": 0})
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    w = torch.randn(33, 64)
    packed, state = Q.quantize_4bit(w, "nf4", 64, True)
    with pytest.warns(UserWarning, match="native 4-bit decode unavailable.*pure-torch decode"):
        out = DQ.dequantize_4bit(packed, state)
    assert native.status().startswith("unavailable:") and "no-such-cc" in native.status()
    with native.disabled():
        assert torch.equal(out, DQ.dequantize_4bit(packed, state))
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
def test_lora_over_4bit_step_identical_with_and_without_native():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(192, 320))
    layer = LoraLinear(base)
    layer.update_layer("default", r=4, lora_alpha=8, lora_dropout=0.0)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 192)
    results = []
    for off in (False, True):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        if off:
            with native.disabled():
                y = layer(xi)
                y.square().sum().backward()
        else:
            y = layer(xi)
            y.square().sum().backward()
        results.append((y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone()))
    for fast, reference in zip(*results):
        assert torch.equal(fast, reference)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
@pytest.mark.parametrize("n", [1, 3, 4, 5, 1000, 4097])
@pytest.mark.parametrize("drop", [1, 6554, 32768, 65535])
def test_dropout_kernel_equals_the_torch_twin_bit_for_bit(n, drop):
    """dropout.c against lora_fused's torch SplitMix64 twin: the mask, x * mask and acc += x * mask, for
    sizes that end inside a 64-bit word and drop thresholds from 1/65536 to 65535/65536."""
    from loralab.core.lora_fused import keep_from_seed

    g = torch.Generator().manual_seed(n)
    x, acc = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x[: min(n, 3)] = torch.tensor([float("inf"), float("nan"), -0.0])[: min(n, 3)]  # x * 0 must match torch's
    for seed in (0, 1, -1, 2**63 - 1, -(2**63), 0x1234_5678_9ABC_DEF0):
        out, added = torch.empty(n), acc.clone()
        assert native.dropout(None, out, seed, drop)
        with native.disabled():
            keep = keep_from_seed(x, seed, drop)
        assert torch.equal(out, keep)
        assert native.dropout(x, out, seed, drop)
        assert torch.equal(out.nan_to_num(7.0), (x * keep).nan_to_num(7.0))
        assert native.dropout(x, added, seed, drop, accumulate=True)
        assert torch.equal(added.nan_to_num(7.0), acc.addcmul(x, keep).nan_to_num(7.0))
    rate = 1 - keep_from_seed(torch.empty(200_000), 99, drop).mean().item()
    assert abs(rate - drop / 65536) < 5 * (drop / 65536 * (1 - drop / 65536) / 200_000) ** 0.5 + 1e-9


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
def test_dropout_kernel_refuses_what_it_cannot_read():
    x = torch.randn(8, 6)
    assert not native.dropout(x.t(), torch.empty(6, 8), 1, 100)  # not contiguous
    assert not native.dropout(x.double(), torch.empty(8, 6, dtype=torch.float64), 1, 100)  # not fp32
    assert not native.dropout(x, torch.empty(47), 1, 100)  # sizes differ
    for drop in (0, 65536):  # keep all / drop all: the torch path (the kernel's 16-bit compare can't say it)
        assert not native.dropout(x, torch.empty(8, 6), 1, drop)
    from loralab.core.lora import keep_mask

    assert keep_mask(x, 0.0)[0].eq(1).all()
    with native.disabled():
        assert not native.dropout(x, torch.empty(8, 6), 1, 100)
