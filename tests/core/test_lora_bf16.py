"""bf16 compute through the fused LoRA node: a bfloat16 input and base with float32 adapters.

Reference: the same (bf16-rounded) x, W, b, A, B in float64, y = x W^T + b + s B A (m * x) / (1 - p),
and its analytic gradients. The node rounds A and B to bf16 and its outputs to bf16, so each result is
compared with a relative Frobenius error bound of 2^-6 (bf16 has an 8-bit significand: one rounding
is <= 2^-9 relative; a product chain of three roundings plus bf16 accumulation stays well under 2^-6).
"""
import pytest
import torch
from torch import nn

from loralab.core import lora_fused
from loralab.core.linear4bit import Linear4bit
from loralab.core.lora import LoraLinear, keep_mask

TOL = 2 ** -6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _layer(base: nn.Module, r=8, alpha=16.0, p=0.0, enable=None) -> LoraLinear:
    layer = LoraLinear(base)
    layer.update_layer("default", r, alpha, p, enable=enable)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    return layer


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = lora_fused.BasePlusLora.apply

    def apply(*a):
        calls.append(a[0].dtype)
        return real(*a)
    monkeypatch.setattr("loralab.core.lora.BasePlusLora.apply", apply)
    return calls


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("enable", [None, [True, False, True]])
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_input_fp32_adapter_matches_float64(spy, p, enable, autocast):
    torch.manual_seed(0)
    base = nn.Linear(48, 96).to(torch.bfloat16).requires_grad_(False)
    layer = _layer(base, p=p, enable=enable).train()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32
    x = torch.randn(2, 40, 48, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    assert spy == [torch.bfloat16], "the fused node was not used"
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y.backward(g)
    assert A.grad.dtype == B.grad.dtype == torch.float32

    torch.manual_seed(7)
    m = keep_mask(x.detach(), p)[0].double() if p else torch.ones(x.shape, dtype=torch.float64)
    p_used = keep_mask(torch.zeros(1), p)[1] if p else 0.0
    xd = x.detach().double().requires_grad_()
    Ad = A.detach().bfloat16().double().requires_grad_()
    Bd = B.detach().bfloat16().double().requires_grad_()
    W, b, s = base.weight.double(), base.bias.double(), layer.scaling["default"]
    h = (xd * m / (1 - p_used)) @ Ad.T
    if enable is None:
        upd = h @ Bd.T
    else:  # slices q, v (out 0..31 and 64..95) from the two halves of A and B
        z = torch.zeros(2, 40, 32, dtype=torch.float64)
        upd = torch.cat([h[..., :8] @ Bd[:32].T, z, h[..., 8:] @ Bd[32:].T], dim=-1)
    ref = xd @ W.T + b + s * upd
    ref.backward(g.double())
    assert _rel(y, ref) < TOL
    assert _rel(x.grad, xd.grad) < TOL
    assert _rel(A.grad, Ad.grad) < TOL
    assert _rel(B.grad, Bd.grad) < TOL


def test_bf16_over_4bit_base_uses_the_node(spy):
    torch.manual_seed(1)
    lin = nn.Linear(128, 64, bias=False)
    q = Linear4bit.from_linear(lin, "nf4", True, 64, torch.bfloat16)
    layer = _layer(q, r=4, alpha=8.0).train()
    x = torch.randn(16, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert spy == [torch.bfloat16]
    W = q.dequantize(torch.float64)
    A = layer.lora_A["default"].weight.detach().bfloat16().double()
    B = layer.lora_B["default"].weight.detach().bfloat16().double()
    ref = x.detach().double() @ (W + 2.0 * B @ A).T
    assert _rel(y, ref) < TOL
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32


def test_float32_input_over_bf16_base_is_not_fused(spy):
    """A dtype mix the node does not handle goes through plain autograd (and still adds the update)."""
    base = nn.Linear(16, 16).to(torch.bfloat16).requires_grad_(False)
    layer = _layer(base)
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError):
        layer(x)  # the bf16 base itself refuses a float32 input: nothing silently changes dtype
    assert spy == []


def test_bf16_dropout_mask_from_the_kernel_equals_the_torch_twin(monkeypatch):
    """The native kernel writes a bf16 input's mask through float32; the bits must be the torch twin's."""
    from loralab.core import native

    if native.library() is None:
        pytest.skip("no C compiler: only the torch twin exists")
    like = torch.empty(333, 70, dtype=torch.bfloat16)
    fast = lora_fused.keep_from_seed(like, 12345, 6554)
    monkeypatch.setattr(native, "dropout", lambda *a, **k: False)
    twin = lora_fused.keep_from_seed(like, 12345, 6554)
    assert fast.dtype == twin.dtype == torch.bfloat16
    assert torch.equal(fast, twin) and 0.85 < float(fast.float().mean()) < 0.95
