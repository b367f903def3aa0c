"""LoraLinear against explicit float64 formulas: y = W0 x + b + scaling * B A x."""
import contextlib
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab.core.lora import LoraLinear, keep_mask

D = torch.float64


def _randomize(layer: LoraLinear, name: str) -> None:
    """Nonzero B so the update is visible (a fresh adapter has B = 0)."""
    with torch.no_grad():
        layer.lora_B[name].weight.normal_()


def _W(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in)."""
    return base.weight.T if isinstance(base, Conv1D) else base.weight


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("frozen", [True, False], ids=["fused-fn", "autograd"])
@pytest.mark.parametrize("make_base", [lambda: nn.Linear(10, 6), lambda: Conv1D(6, 10)], ids=["linear", "conv1d"])
def test_forward_matches_float64_formula(make_base, frozen):
    base = make_base().to(D)
    base.weight.requires_grad_(not frozen)  # a frozen base takes the one-node autograd function
    layer = LoraLinear(base)
    layer.update_layer("a", r=3, lora_alpha=6)
    _randomize(layer, "a")
    x = torch.randn(2, 5, 10, dtype=D)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert A.shape == (3, 10) and B.shape == (6, 3)
    ref = x @ _W(base).T + base.bias + 2.0 * (x @ A.T @ B.T)
    assert layer._fast_path_ok(x, (), {}) == frozen
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)


def test_fresh_adapter_is_exact_noop_and_init_distributions():
    base = nn.Linear(400, 8)
    layer = LoraLinear(base)
    layer.update_layer("k", r=16, lora_alpha=16)
    layer.update_layer("g", r=16, lora_alpha=16, init_lora_weights="gaussian")
    x = torch.randn(4, 400)
    assert torch.equal(layer(x), base(x))
    A = layer.lora_A["k"].weight
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert torch.all(layer.lora_B["k"].weight == 0) and torch.all(layer.lora_B["g"].weight == 0)
    assert abs(layer.lora_A["g"].weight.std().item() - 1 / 16) < 0.05 / 16


def test_rslora_scaling():
    layer = LoraLinear(nn.Linear(5, 5).to(D))
    layer.update_layer("rs", r=4, lora_alpha=8, use_rslora=True)
    layer.update_layer("std", r=4, lora_alpha=8)
    assert layer.scaling["rs"] == pytest.approx(8 / math.sqrt(4)) and layer.scaling["std"] == pytest.approx(2.0)
    layer.set_adapter("rs")
    _randomize(layer, "rs")
    x = torch.randn(3, 5, dtype=D)
    A, B = layer.lora_A["rs"].weight, layer.lora_B["rs"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 4.0 * x @ (B @ A).T, rtol=0, atol=1e-12)


def _fused_reference(layer: LoraLinear, name: str, enable: list[bool]) -> torch.Tensor:
    """Dense (out x in) update assembled by hand from the documented layout."""
    r, k = layer.r[name], sum(enable)
    d = layer.out_features // len(enable)
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    assert A.shape == (r * k, layer.in_features) and B.shape == (d * k, r)
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=D)
    i = 0
    for slot, on in enumerate(enable):
        if on:
            delta[slot * d:(slot + 1) * d] = B[i * d:(i + 1) * d] @ A[i * r:(i + 1) * r]
            i += 1
    return layer.scaling[name] * delta


@pytest.mark.parametrize("enable", [[True, False, True], [False, True, False], [True, True, True]])
def test_fused_slices_match_dense_reference_without_building_it(enable, monkeypatch):
    base = Conv1D(3 * 8, 8).to(D)  # GPT-2 c_attn shape: in d, out 3d
    layer = LoraLinear(base)
    layer.update_layer("qv", r=2, lora_alpha=4, enable=enable)
    _randomize(layer, "qv")
    x = torch.randn(2, 3, 8, dtype=D)
    ref = x @ base.weight + base.bias + x @ _fused_reference(layer, "qv", enable).T
    monkeypatch.setattr(LoraLinear, "delta_weight", lambda *a: pytest.fail("forward built the dense update"))
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # disabled slices are exactly the base output
    base_out = x @ base.weight + base.bias
    for slot, on in enumerate(enable):
        if not on:
            assert torch.equal(out[..., slot * 8:(slot + 1) * 8], base_out[..., slot * 8:(slot + 1) * 8])


def test_fused_merge_equals_dense_reference():
    base = nn.Linear(8, 24).to(D)
    W0 = base.weight.detach().clone()
    layer = LoraLinear(base)
    layer.update_layer("qv", r=2, lora_alpha=2, enable=[True, False, True])
    _randomize(layer, "qv")
    layer.merge()
    torch.testing.assert_close(base.weight, W0 + _fused_reference(layer, "qv", [True, False, True]), rtol=0, atol=1e-12)


def test_fused_enable_must_divide_out_features():
    with pytest.raises(ValueError, match="divisible"):
        LoraLinear(nn.Linear(4, 10)).update_layer("a", 2, 2, enable=[True, False, True])


@pytest.mark.parametrize("frozen", [True, False], ids=["fused-fn", "autograd"])
def test_dropout_only_on_lora_input(frozen):
    """r = in, A = I, B = I: the LoRA delta is s * dropout(x) exactly, so each entry of y - base(x) is 0 or
    s x / (1 - p); the base output itself never sees the mask."""
    p, n = 0.25, 64
    base = nn.Linear(n, n).to(D)
    base.weight.requires_grad_(not frozen)
    layer = LoraLinear(base)
    layer.update_layer("d", r=n, lora_alpha=n, lora_dropout=p)  # scaling 1
    with torch.no_grad():
        layer.lora_A["d"].weight.copy_(torch.eye(n))
        layer.lora_B["d"].weight.copy_(torch.eye(n))
    x = torch.randn(200, n, dtype=D)
    layer.train()
    delta = layer(x) - (x @ base.weight.T + base.bias)
    kept = (delta - x / (1 - p)).abs() < 1e-9
    dropped = delta.abs() < 1e-9
    assert torch.all(kept | dropped)
    assert abs(dropped.double().mean().item() - p) < 0.02
    layer.eval()
    torch.testing.assert_close(layer(x), x @ base.weight.T + base.bias + x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("frozen", [True, False], ids=["fused-fn", "autograd"])
def test_dropout_expectation_equals_undropped_update(frozen):
    base = nn.Linear(6, 4).to(D)
    base.weight.requires_grad_(not frozen)
    layer = LoraLinear(base)
    layer.update_layer("d", r=2, lora_alpha=2, lora_dropout=0.5)
    _randomize(layer, "d")
    x = torch.randn(1, 6, dtype=D).expand(20000, 6)
    layer.train()
    mean_delta = (layer(x) - base(x)).mean(0)
    A, B = layer.lora_A["d"].weight, layer.lora_B["d"].weight
    torch.testing.assert_close(mean_delta, (x[0] @ A.T @ B.T), rtol=0, atol=0.05)


def test_only_lora_parameters_get_gradients():
    base = nn.Linear(6, 4)
    base.requires_grad_(False)
    layer = LoraLinear(base)
    layer.update_layer("a", 2, 2)
    _randomize(layer, "a")
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    got = {n for n, p in layer.named_parameters() if p.grad is not None}
    assert got == {"lora_A.a.weight", "lora_B.a.weight"}
    assert layer.lora_A["a"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(10, 6), lambda: Conv1D(6, 10)], ids=["linear", "conv1d"])
def test_merge_unmerge_round_trip_and_double_merge_refused(make_base):
    base = make_base()
    W0 = base.weight.detach().clone()
    layer = LoraLinear(base)
    layer.update_layer("a", 3, 6)
    _randomize(layer, "a")
    x = torch.randn(4, 10)
    unmerged = layer(x)
    layer.merge()
    delta = 2.0 * (layer.lora_B["a"].weight.double() @ layer.lora_A["a"].weight.double())
    expected_W = W0.double() + (delta.T if isinstance(base, Conv1D) else delta)
    torch.testing.assert_close(base.weight.double(), expected_W, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge(["a"])
    layer.unmerge()
    torch.testing.assert_close(base.weight, W0, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge(["a"])


def test_merged_forward_skips_lora_branch():
    """After merge the LoRA weights are not read at all: poisoning them changes nothing."""
    base = nn.Linear(5, 5)
    layer = LoraLinear(base)
    layer.update_layer("a", 2, 2)
    _randomize(layer, "a")
    layer.merge()
    with torch.no_grad():
        layer.lora_A["a"].weight.fill_(float("nan"))
    x = torch.randn(3, 5)
    assert torch.equal(layer(x), base(x))


def test_two_adapters_sum_when_both_active_and_switch():
    base = nn.Linear(6, 4).to(D)
    layer = LoraLinear(base)
    layer.update_layer("a", 2, 2)
    layer.update_layer("b", 3, 6)
    _randomize(layer, "a"), _randomize(layer, "b")
    x = torch.randn(5, 6, dtype=D)

    def upd(n):
        return layer.scaling[n] * x @ (layer.lora_B[n].weight @ layer.lora_A[n].weight).T

    torch.testing.assert_close(layer(x), base(x) + upd("a") + upd("b"), rtol=0, atol=1e-12)
    layer.set_adapter("b")
    torch.testing.assert_close(layer(x), base(x) + upd("b"), rtol=0, atol=1e-12)
    layer.delete_adapter("a")
    assert "a" not in layer.lora_A and "a" not in layer.scaling


class FakeQuantLinear(nn.Module):
    """Stand-in for a 4-bit base: exposes in/out features and dequantize(), stores int8 codes."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.scale = w.abs().max() / 127
        self.weight = nn.Parameter(torch.round(w / self.scale).to(torch.int8), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x):
        return x @ self.dequantize().T


def test_quantized_base_forward_and_merge_refused():
    base = FakeQuantLinear(torch.randn(4, 6))
    layer = LoraLinear(base)
    assert layer.kind == "quantized"
    layer.update_layer("q", 2, 4)
    assert layer.lora_A["q"].weight.dtype == torch.float32
    _randomize(layer, "q")
    x = torch.randn(3, 6)
    A, B = layer.lora_A["q"].weight, layer.lora_B["q"].weight
    torch.testing.assert_close(layer(x), x @ base.dequantize().T + 2 * x @ A.T @ B.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="quantized"):
        layer.merge()


def test_bf16_base_keeps_dtype_with_fp32_adapters():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.update_layer("a", 2, 2)
    assert layer.lora_A["a"].weight.dtype == torch.float32
    _randomize(layer, "a")
    x = torch.randn(3, 8).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    ref = x.double() @ base.weight.double().T + base.bias.double() + x.double() @ A.T @ B.T
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=5e-2)
    layer.merge()
    assert base.weight.dtype == torch.bfloat16


def test_unsupported_base_rejected():
    with pytest.raises(TypeError, match="cannot wrap"):
        LoraLinear(nn.LayerNorm(4))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("enable", [None, [True, False, True]], ids=["plain", "fused"])
@pytest.mark.parametrize("make_base", [lambda: nn.Linear(8, 12), lambda: Conv1D(12, 8)], ids=["linear", "conv1d"])
def test_fused_function_gradients(make_base, enable, p):
    """The hand-written backward of the one-node function: finite differences (gradcheck, dropout mask
    fixed by reseeding) and, without dropout, equality with plain autograd through the generic path."""
    base = make_base().to(D)
    base.weight.requires_grad_(False)
    layer = LoraLinear(base)
    layer.update_layer("a", 2, 4, init_lora_weights=False, enable=enable, lora_dropout=p)
    x = torch.randn(3, 5, 8, dtype=D, requires_grad=True)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert layer._fast_path_ok(x, (), {})

    def fn(x, A, B, bias):
        torch.manual_seed(1)
        return layer(x)

    assert torch.autograd.gradcheck(fn, (x, A, B, base.bias))
    if p == 0:
        grads = []
        for forward in (layer, layer._forward_generic):
            out = forward(x)
            grads.append(torch.autograd.grad(out.pow(2).sum(), (x, A, B, base.bias)))
        for fast, generic in zip(*grads):
            torch.testing.assert_close(fast, generic, rtol=0, atol=1e-12)


def test_keep_mask_rate_and_resolution():
    x = torch.empty(400, 1000)
    keep, p_used = keep_mask(x, 0.1)
    assert p_used == round(0.1 * 65536) / 65536 and abs(p_used - 0.1) < 2**-16
    assert set(keep.unique().tolist()) == {0.0, 1.0} and keep.dtype == x.dtype
    # 400k Bernoulli draws: the drop rate is within 5 standard deviations, in each of the 4 lanes of a draw
    sd = (0.1 * 0.9 / 100_000) ** 0.5
    for lane in range(4):
        assert abs((1 - keep.flatten()[lane::4].mean().item()) - p_used) < 5 * sd
    assert keep_mask(x, 0.25)[1] == 0.25
    assert not torch.equal(keep_mask(x, 0.1)[0], keep_mask(x, 0.1)[0])  # each call draws a fresh seed


def _splitmix64(seed: int, n: int) -> list[int]:
    """SplitMix64 (Steele, Lea & Flood 2014) in Python integers: the state advances by the golden gamma
    and each output is the state mixed."""
    mask, out, state = (1 << 64) - 1, [], seed & ((1 << 64) - 1)
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("native_kernel", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_keep_mask_is_the_threshold_of_16_splitmix64_bits_per_element(dtype, native_kernel):
    from loralab.core import native
    from loralab.core.lora_fused import draw_seed

    if native_kernel and native.library() is None:
        pytest.skip(f"native kernel {native.status()}")
    x = torch.empty(37, 29, dtype=dtype)  # odd size: the last 64-bit word is only partly used
    torch.manual_seed(3)
    if native_kernel:
        keep, p_used = keep_mask(x, 0.3)
    else:
        with native.disabled():
            keep, p_used = keep_mask(x, 0.3)
    torch.manual_seed(3)  # the same seed, the stream and lanes decoded independently
    words = _splitmix64(draw_seed(), (x.numel() + 3) // 4)
    lanes = [(w >> (16 * k)) & 0xFFFF for w in words for k in range(4)]  # low 16 bits first
    drop = round(0.3 * 65536)
    expected = torch.tensor([float(u >= drop) for u in lanes[:x.numel()]]).view(x.shape)
    assert keep.dtype == dtype and torch.equal(keep.float(), expected) and p_used == drop / 65536


def test_over_real_linear4bit():
    from loralab.core.inject import count_parameters
    from loralab.core.linear4bit import Linear4bit, merge_to_full_precision

    q = Linear4bit.from_linear(nn.Linear(64, 32))
    layer = LoraLinear(q)
    layer.update_layer("q", 4, 8)
    _randomize(layer, "q")
    x = torch.randn(3, 64)
    A, B = layer.lora_A["q"].weight.double(), layer.lora_B["q"].weight.double()
    ref = x.double() @ q.dequantize(torch.float32).double().T + q.bias.double() + 2 * x.double() @ A.T @ B.T
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="merge_to_full_precision"):
        layer.merge()
    assert count_parameters(layer) == (4 * (64 + 32), 64 * 32 + 32 + 4 * (64 + 32))
    torch.testing.assert_close(merge_to_full_precision(layer)(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_uses_autograd_path_and_stays_close():
    base = nn.Linear(16, 8)
    base.requires_grad_(False)
    layer = LoraLinear(base)
    layer.update_layer("a", 4, 8)
    _randomize(layer, "a")
    x = torch.randn(5, 16, requires_grad=True)
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    ref = x.double() @ base.weight.double().T + base.bias.double() + 2 * x.double() @ A.T @ B.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._fast_path_ok(x, (), {})
        out = layer(x)
    out.float().sum().backward()
    assert layer.lora_A["a"].weight.grad is not None and x.grad is not None
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=6e-2)


@pytest.mark.parametrize("enable", [None, [True, False, True]], ids=["plain", "fused"])
@pytest.mark.parametrize("make_base", [lambda: nn.Linear(8, 12), lambda: Conv1D(12, 8)], ids=["linear", "conv1d"])
def test_inference_with_many_rows_builds_the_dense_update_and_leaves_w0(make_base, enable, monkeypatch):
    """No grad and rows * (in + out) > in * out: one matmul with W0 + s B A for the call (the two skinny
    products cost more); W0 is untouched, few rows or a gradient keep the skinny path."""
    base = make_base().to(D).requires_grad_(False)
    layer = LoraLinear(base)
    layer.update_layer("a", r=2, lora_alpha=4, enable=enable)
    _randomize(layer, "a")
    delta = _fused_reference(layer, "a", enable) if enable else 2.0 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    w0 = base.weight.clone()
    dense_rows = []
    original = layer._forward_dense_update
    monkeypatch.setattr(layer, "_forward_dense_update", lambda x, name: dense_rows.append(x.shape[0]) or original(x, name))
    many, few = torch.randn(50, 8, dtype=D), torch.randn(3, 8, dtype=D)  # 50 * 20 > 8 * 12 > 3 * 20
    for x in (many, few):
        ref = x @ _W(base).T + base.bias + x @ delta.T
        with torch.no_grad():
            torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)
        layer.eval()  # eval mode changes nothing here (dropout 0): still the same numbers
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)
        layer.train()
    assert dense_rows == [50]  # the grad-enabled calls (A, B trainable) and the 3-row call stayed skinny
    assert torch.equal(base.weight, w0) and not layer.merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_node_saves_only_x_and_the_native_kernel_and_scratch_change_nothing(monkeypatch, dtype):
    """With dropout the node keeps x (the caller's tensor) and h -- no mask, no masked input, no random
    bits: backward rebuilds the mask from the seed -- and the C kernel (fp32), the torch twin and fresh
    temporaries instead of the scratch all give the same numbers bit for bit."""
    from loralab.core import lora_fused, native

    base = nn.Linear(16, 12).to(dtype).requires_grad_(False)
    layer = LoraLinear(base)
    layer.update_layer("a", 4, 8, lora_dropout=0.3)
    _randomize(layer, "a")
    x = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    saved = []
    results = []
    for cap, kernel_off in ((lora_fused.SCRATCH_MAX_BYTES, False), (0, False), (lora_fused.SCRATCH_MAX_BYTES, True)):
        monkeypatch.setattr(lora_fused, "SCRATCH_MAX_BYTES", cap)
        torch.manual_seed(7)
        with native.disabled() if kernel_off else contextlib.nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = layer(x)
            grads = torch.autograd.grad(y.square().sum(), (x, layer.lora_A["a"].weight, layer.lora_B["a"].weight))
        results.append((y.detach(), *grads))
    for variant in results[1:]:
        for got, want in zip(variant, results[0]):
            assert torch.equal(got, want)
    input_sized = [t for t in saved if t.numel() >= x.numel()]
    assert input_sized and all(t.data_ptr() == x.data_ptr() for t in input_sized)
    assert not any(t.dtype in (torch.int16, torch.int64, torch.bool) for t in saved)
    # and dropout really happened: the LoRA gradient differs from the undropped one
    layer.eval()
    undropped = torch.autograd.grad(layer(x).square().sum(), layer.lora_A["a"].weight)[0]
    assert not torch.allclose(undropped, results[0][2])
