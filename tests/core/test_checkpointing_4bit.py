"""Gradient checkpointing with LoRA over a 4-bit base: the LoRA gradients equal the non-checkpointed ones.

Tiny random Llama (hidden 64, 2 layers), every decoder Linear quantized to NF4 + double quant by
loralab, LoRA on q_proj / v_proj (B randomised so that A's gradient is non-zero too). The reference is
the same model without checkpointing; recomputation runs the same ops on the same inputs, so the
tolerance is fp32 round-off only (atol 1e-6, rtol 1e-5). Both torch checkpoint flavours are checked:
reentrant (needs inputs that require grad: ``enable_input_require_grads``) and non-reentrant.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
linear4bit = pytest.importorskip("loralab.core.linear4bit")

from loralab.core.config import LoraConfig  # noqa: E402
from loralab.core.inject import inject_adapter, lora_modules  # noqa: E402


def _tiny_qlora_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model = linear4bit.quantize_model(model, quant_type="nf4", double_quant=True,
                                      compute_dtype=torch.float32, skip_modules=["lm_head"])
    model.requires_grad_(False)
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    return model


def _lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_lora_grads_over_4bit_base_equal_with_and_without_checkpointing(use_reentrant):
    model = _tiny_qlora_llama()
    n_quantized = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert n_quantized == 2 * 7, "all decoder Linears should be 4-bit (q,k,v,o,gate,up,down x 2 layers)"
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    reference = _lora_grads(model, ids)

    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed.enable_input_require_grads()
    checkpointed.train()
    assert checkpointed.model.gradient_checkpointing
    calls = {"n": 0}
    layer0 = checkpointed.model.layers[0].self_attn.q_proj
    layer0.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    grads = _lora_grads(checkpointed, ids)
    assert calls["n"] == 2, "checkpointing should re-run the forward of layer 0 during backward"

    assert set(grads) == set(reference) and len(reference) == 2 * 2 * 2  # A, B of q, v in 2 layers
    for name, expected in reference.items():
        assert expected.abs().sum() > 0, f"{name}: zero reference gradient, the test would be vacuous"
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    for name, p in checkpointed.named_parameters():
        assert p.requires_grad == ("lora_" in name), name  # the 4-bit base stays frozen
