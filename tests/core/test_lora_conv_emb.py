"""LoraConv2d and LoraEmbedding against float64 references."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loralab.core.lora_conv_emb import LoraConv2d, LoraEmbedding

D = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _conv_layer(**kw) -> LoraConv2d:
    base = nn.Conv2d(3, 5, kernel_size=3, **kw).to(D)
    layer = LoraConv2d(base)
    layer.update_layer("a", r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    return layer


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2)])
def test_conv2d_forward_equals_conv_with_merged_kernel(kw):
    layer = _conv_layer(**kw)
    base = layer.base_layer
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert A.shape == (2, 3, 3, 3) and B.shape == (5, 2, 1, 1)
    # merged kernel by hand: W0[o,i,h,w] + s * sum_r B[o,r] A[r,i,h,w]
    kernel = base.weight + 2.0 * torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A)
    x = torch.randn(2, 3, 9, 9, dtype=D)
    ref = F.conv2d(x, kernel, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)


def test_conv2d_merge_unmerge():
    layer = _conv_layer(padding=1)
    x = torch.randn(1, 3, 6, 6, dtype=D)
    W0, out = layer.base_layer.weight.detach().clone(), layer(x)
    layer.merge()
    assert layer._branch == ()
    torch.testing.assert_close(layer(x), out, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge(["a"])
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-12)


def test_conv2d_fresh_adapter_noop_and_groups_refused():
    base = nn.Conv2d(4, 4, 3)
    layer = LoraConv2d(base)
    layer.update_layer("a", 2, 2)
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(layer(x), base(x))
    with pytest.raises(ValueError, match="groups=1"):
        LoraConv2d(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_forward_matches_formula(padding_idx):
    base = nn.Embedding(11, 6, padding_idx=padding_idx).to(D)
    layer = LoraEmbedding(base)
    layer.update_layer("e", r=3, lora_alpha=6)
    A, B = layer.lora_embedding_A["e"], layer.lora_embedding_B["e"]
    assert A.shape == (3, 11) and B.shape == (6, 3)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    assert torch.equal(layer(ids), base(ids))  # A = 0: fresh adapter is a no-op
    with torch.no_grad():
        A.normal_()
    table = base.weight + 2.0 * (B @ A).T
    torch.testing.assert_close(layer(ids), table[ids], rtol=0, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(base.weight, table, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(ids), table[ids], rtol=0, atol=1e-12)


def test_embedding_gradients_and_padding_row():
    base = nn.Embedding(8, 4, padding_idx=0)
    base.requires_grad_(False)
    layer = LoraEmbedding(base)
    layer.update_layer("e", 2, 2)
    layer(torch.tensor([[0, 1, 2]])).pow(2).sum().backward()
    A = layer.lora_embedding_A["e"]
    assert A.grad is not None and A.grad[:, 1:3].abs().sum() > 0
    assert torch.all(A.grad[:, 0] == 0)  # padding_idx row of A^T gets no gradient, as in the base
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {
        "lora_embedding_A.e", "lora_embedding_B.e"}
