"""merged_copy: a plain model whose outputs equal the adapted model's, with the model itself untouched;
the bf16 copy holds round(W0 + scaling B A) exactly; disabled adapters, 4-bit bases, fused GPT-2 slices,
tied embeddings and modules_to_save heads; bottleneck adapters refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loralab.core.adapters import add_adapters
from loralab.core.config import LoraConfig
from loralab.core.inject import disable_adapters, inject_adapter, lora_modules
from loralab.core.linear4bit import Linear4bit, quantize_model
from loralab.core.lora import LoraLayer
from loralab.core.merged_copy import merged_copy, mergeable
from loralab.models.tiny import tiny_model

IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _adapted(arch: str = "llama", **config) -> nn.Module:
    model = tiny_model(arch, "causal_lm", seed=0)
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **config))
    torch.manual_seed(1)
    for _, layer in lora_modules(model):  # a "trained" adapter: B != 0
        for B in layer.lora_B.values():
            nn.init.normal_(B.weight, std=0.2)
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_fp32_copy_equals_the_adapted_model_which_stays_unmerged():
    model = _adapted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = merged_copy(model)
    assert not any(isinstance(m, LoraLayer) for m in copy.modules())
    assert not any(p.requires_grad for p in copy.parameters()) and not copy.training
    torch.testing.assert_close(_logits(copy), _logits(model), rtol=1e-5, atol=1e-5)
    assert _logits(copy).sub(_logits(tiny_model("llama", "causal_lm", seed=0))).abs().max() > 1e-3  # B != 0 shows
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not layer.merged for _, layer in lora_modules(model))


def test_bf16_copy_rounds_the_fp32_merge_once():
    model = _adapted()
    copy = merged_copy(model, torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    W0, A, B = layer.base_layer.weight.double(), layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = (W0 + layer.scaling["default"] * B @ A).to(torch.float32).to(torch.bfloat16)
    got = copy.model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2 ** -8  # one bf16 ulp
    assert torch.equal(copy.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    inv_freq = [b for n, b in copy.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)  # buffers keep their dtype


def test_disabled_adapters_give_the_base_model():
    model, base = _adapted(), tiny_model("llama", "causal_lm", seed=0)
    with disable_adapters(model):
        copy = merged_copy(model)
    torch.testing.assert_close(_logits(copy), _logits(base), rtol=1e-6, atol=1e-6)


def test_fused_gpt2_slices_and_tied_embeddings():
    model = _adapted("gpt2", fused_qkv={"c_attn": [True, False, True]})
    copy = merged_copy(model)
    torch.testing.assert_close(_logits(copy), _logits(model), rtol=1e-5, atol=1e-5)
    assert copy.lm_head.weight is copy.transformer.wte.weight  # tied weights stay one tensor


def test_4bit_base_is_dequantized_and_merged():
    model = tiny_model("llama", "causal_lm", seed=0)
    quantize_model(model, "nf4")
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.2)
    copy = merged_copy(model.eval())
    assert not any(isinstance(m, Linear4bit) for m in copy.modules())
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    torch.testing.assert_close(_logits(copy), _logits(model), rtol=1e-4, atol=1e-4)


def test_modules_to_save_head_is_the_trained_copy():
    model = _adapted(modules_to_save=["lm_head"])
    head = model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(0.5)
    copy = merged_copy(model)
    torch.testing.assert_close(_logits(copy), _logits(model), rtol=1e-5, atol=1e-5)
    assert isinstance(copy.lm_head, nn.Linear)


def test_bottleneck_adapters_are_refused():
    model = tiny_model("llama", "causal_lm", seed=0)
    add_adapters(model, "adapter_h", r=4)
    assert not mergeable(model) and mergeable(_adapted())
    with pytest.raises(ValueError, match="bottleneck adapters and prefixes"):
        merged_copy(model)
