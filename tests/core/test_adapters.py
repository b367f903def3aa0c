"""Bottleneck adapters: the paper's count, identity at init, the math, placement, gradients, refusals."""
import pytest
import torch

from loralab.core.adapters import AdapterWrapper, BottleneckAdapter, add_adapters, adapter_count, merge_adapters
from loralab.models.tiny import ARCHS, tiny_model

L, D, R = 2, 32, 4  # tiny configs: 2 layers, hidden 32; bottleneck 4


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomise(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Hu et al. 2021, Sec. 5.1: |Θ| = L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d, with L̂ per variant:
#   Adapter^H: L̂_Adpt = 2L, L̂_LN = 0;  Adapter^L: L̂_Adpt = L, L̂_LN = L;  Adapter^P: L̂_Adpt = L, L̂_LN = 0.
PAPER = {"adapter_h": 2 * L * (2 * D * R + R + D), "adapter_l": L * (2 * D * R + R + D) + 2 * L * D,
         "adapter_p": L * (2 * D * R + R + D)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", sorted(PAPER))
def test_count_matches_paper_formula_and_the_model(arch, variant):
    model = tiny_model(arch)
    info = add_adapters(model, variant, r=R)
    assert PAPER == {"adapter_h": 1168, "adapter_l": 712, "adapter_p": 584}  # the numbers, written out
    assert info["count"] == PAPER[variant] == _trainable(model)
    assert adapter_count(D, R, info["n_adapters"], info["n_layernorms"]) == PAPER[variant]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", sorted(PAPER))
def test_identity_at_init_and_grads_only_to_adapters(arch, variant):
    model = tiny_model(arch)
    batch = _batch()
    ref = model(**batch).last_hidden_state
    add_adapters(model, variant, r=R)
    out = model(**batch).last_hidden_state
    assert torch.equal(out, ref)  # W_up = 0, b_up = 0: exactly the base model
    _randomise(model)
    out = model(**batch).last_hidden_state
    assert not torch.allclose(out, ref)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ".adapter." in name and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_adapter_math_against_manual_formula():
    torch.manual_seed(0)
    h = torch.randn(3, 5, D)
    for ln in (False, True):
        a = BottleneckAdapter(D, R, "relu", layernorm=ln)
        with torch.no_grad():
            for p in a.parameters():
                p.copy_(torch.randn(p.shape))
        x = h
        if ln:
            mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
            x = (h - mu) / torch.sqrt(var + 1e-5) * a.layernorm.weight + a.layernorm.bias
        manual = h + torch.clamp(x @ a.down.weight.T + a.down.bias, min=0) @ a.up.weight.T + a.up.bias
        torch.testing.assert_close(a(h), manual)
        assert sum(p.numel() for p in a.parameters()) == 2 * D * R + R + D + (2 * D if ln else 0)


WRAPPED = {  # where each variant goes, layer 0 (see the adapters.py docstring)
    ("bert", "adapter_h"): ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"],
    ("bert", "adapter_p"): ["encoder.layer.0.output.dense"], ("bert", "adapter_l"): ["encoder.layer.0"],
    ("gpt2", "adapter_h"): ["h.0.attn.c_proj", "h.0.mlp.c_proj"], ("gpt2", "adapter_p"): ["h.0.mlp.c_proj"],
    ("gpt2", "adapter_l"): ["h.0"], ("llama", "adapter_h"): ["layers.0.self_attn.o_proj", "layers.0.mlp.down_proj"],
    ("llama", "adapter_p"): ["layers.0.mlp.down_proj"], ("llama", "adapter_l"): ["layers.0"],
}


@pytest.mark.parametrize("arch,variant", sorted(WRAPPED))
def test_placement(arch, variant):
    model = tiny_model(arch)
    add_adapters(model, variant, r=R)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, AdapterWrapper) and ".0" in n + ".")
    assert wrapped == sorted(n for n in WRAPPED[(arch, variant)])


def test_wrapper_applies_adapter_to_the_sublayer_output():
    model = tiny_model("bert")
    add_adapters(model, "adapter_h", r=R)
    _randomise(model)
    wrapper = model.get_submodule("encoder.layer.1.output.dense")
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(wrapper(x), wrapper.adapter(wrapper.base_layer(x)))
    assert wrapper.in_features == 64  # attribute reads fall through to the base Linear


def test_houlsby_train_layernorm_counts_the_layers_norms():
    model = tiny_model("bert")  # 2 LayerNorms per BERT layer: L̂_LN = 2L
    info = add_adapters(model, "adapter_h", r=R, train_layernorm=True)
    assert info["n_layernorms"] == 2 * L
    assert info["count"] == adapter_count(D, R, 2 * L, 2 * L) == _trainable(model) == 1168 + 2 * 4 * D
    llama = tiny_model("llama")  # RMSNorm has a weight only: d per norm, not the formula's 2·d
    info = add_adapters(llama, "adapter_h", r=R, train_layernorm=True)
    assert info["count"] == 1168 + 2 * L * D == _trainable(llama)


def test_refusals_and_merge():
    model = tiny_model("gpt2")
    add_adapters(model, "adapter_p", r=R)
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        add_adapters(model, "adapter_h", r=R)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        merge_adapters(model)
    with pytest.raises(ValueError, match="variant must be one of"):
        add_adapters(tiny_model("gpt2"), "adapter_x")
    with pytest.raises(ValueError, match="adapter_h only"):
        add_adapters(tiny_model("gpt2"), "adapter_p", train_layernorm=True)
