"""Linear4bit, quantize_model, bnb-format checkpoints (both directions with transformers+bitsandbytes),
the streaming 4-bit loader and merges over a 4-bit base.

Oracles: bitsandbytes (functional + nn.Linear4bit on CPU), transformers' own 4-bit loading, and
explicit float64 formulas (x W^T + b, W + scaling B A).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from loralab.core import quant as Q
from loralab.core import quant_io
from loralab.core.linear4bit import (Linear4bit, merge_and_requantize, merge_model, merge_to_full_precision,
                                     quantize_model)
from loralab.core.quant_io import (empty_init, load_model_4bit, load_quantized, load_quantized_from_safetensors,
                                   save_quantized)

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")


def _linear(in_f=96, out_f=64, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.bias.normal_() if bias else None
    return layer


# -- the layer ----------------------------------------------------------------------------------------
def test_linear4bit_stores_buffers_and_dequantizes_like_bnb():
    linear = _linear()
    layer = Linear4bit.from_linear(linear, "nf4", double_quant=True)
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert {n for n, _ in layer.named_buffers()} == {"weight", "absmax", "quant_map", "nested_absmax",
                                                      "nested_quant_map", "offset"}
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (96 * 64 // 2, 1)
    ref_packed, ref_state = F.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type="nf4",
                                            compress_statistics=True)
    assert torch.equal(layer.weight, ref_packed)
    # rows of 96 straddle blocks; bnb's CPU kernel mis-handles that, so use the formula over bnb's state
    absmax = (F.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset).double()
    data = ref_packed.reshape(-1).long()
    q = torch.stack([data >> 4, data & 15], 1).reshape(-1)
    expected = (ref_state.code.double()[q] * absmax.repeat_interleave(64)).reshape(64, 96)
    torch.testing.assert_close(layer.dequantize().double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_equals_bnb_linear4bit(quant_type):
    linear = _linear(128, 64)
    ours = Linear4bit.from_linear(linear, quant_type, double_quant=True)
    theirs = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type=quant_type,
                               compress_statistics=True)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bnb quantizes on .to(device)
    assert theirs.weight.dtype == torch.uint8 and torch.equal(theirs.weight.data, ours.weight)
    x = torch.randn(5, 128)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_forward_backward_formula_and_no_weight_grad():
    linear = _linear()
    layer = Linear4bit.from_linear(linear, "nf4", double_quant=True)
    W = layer.dequantize().double()
    x = torch.randn(3, 7, 96, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y.double(), x.double() @ W.T + layer.bias.double(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ W, rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is None


def test_backward_does_not_save_the_dequantized_weight():
    layer = Linear4bit.from_linear(_linear(256, 128, seed=1), "nf4")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(torch.randn(2, 256, requires_grad=True))
    assert 256 * 128 not in saved and max(saved, default=0) < 256 * 128
    y.sum().backward()


def test_bf16_compute_dtype():
    linear = _linear()
    layer = Linear4bit.from_linear(linear, "nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    W = layer.dequantize()
    assert W.dtype == torch.bfloat16
    expected = (x.float() @ W.float().T + layer.bias).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)


def test_dtype_casts_leave_the_4bit_state_alone_and_state_dict_loads_back():
    layer = Linear4bit.from_linear(_linear(seed=4), "nf4", double_quant=True)
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    assert layer.offset.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), before)
    other = Linear4bit.from_linear(_linear(seed=5), "nf4", double_quant=True)
    other.load_state_dict(Linear4bit.from_linear(_linear(seed=4), "nf4", double_quant=True).state_dict())
    assert torch.equal(other.dequantize(), before)
    broken = {k: v for k, v in layer.state_dict().items() if not k.endswith("nested_absmax")}
    with pytest.raises(RuntimeError, match="weight.nested_absmax is missing"):
        other.load_state_dict(broken)


def test_bits_per_param_of_layer():
    layer = Linear4bit.from_linear(_linear(1024, 1024, bias=False), "nf4", double_quant=True)
    assert round(layer.bits_per_param(), 3) == 4.127
    plain = Linear4bit.from_linear(_linear(1024, 1024, bias=False), "nf4", double_quant=False)
    assert plain.bits_per_param() == pytest.approx(4.5)


# -- LoRA over a 4-bit base ---------------------------------------------------------------------------
def _lora_over_4bit(seed=0):
    lora = pytest.importorskip("loralab.core.lora")
    base = Linear4bit.from_linear(_linear(seed=seed), "nf4", double_quant=True)
    layer = lora.LoraLinear(base)
    layer.update_layer("default", r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    return layer


def test_lora_over_linear4bit_output_and_grads():
    layer = _lora_over_4bit()
    x = torch.randn(5, 96, requires_grad=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = layer.base_layer.dequantize().double()
    expected = x.double() @ W.T + layer.base_layer.bias.double() + 2.0 * (x.double() @ A.double().T) @ B.double().T
    y = layer(x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default.weight", "lora_B.default.weight"}
    assert A.grad is not None and B.grad is not None and A.grad.abs().sum() > 0
    assert layer.base_layer.bias.grad is None


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_over_4bit_takes_the_fused_path_with_exact_grads_and_no_saved_weight(dropout):
    from loralab.core.lora import LoraLinear, keep_mask

    base = Linear4bit.from_linear(_linear(seed=3), "nf4", double_quant=True)
    layer = LoraLinear(base)
    layer.update_layer("default", r=4, lora_alpha=8, lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    layer.train()
    x = torch.randn(2, 5, 96, requires_grad=True)
    assert layer._fast_path_ok(x, (), {})
    saved = []
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert max(saved) < base.out_features * base.in_features  # W is rebuilt in backward, never kept
    g = torch.randn_like(y)
    y.backward(g)
    # float64 reference with the same keep mask (the base matmul draws no random numbers)
    torch.manual_seed(7)
    keep, p_used = keep_mask(x.detach().reshape(-1, 96), dropout) if dropout else (torch.ones(10, 96), 0.0)
    W = base.dequantize().double()
    xd = x.detach().double().requires_grad_(True)
    A = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    x2 = xd.reshape(-1, 96)
    ref = x2 @ W.T + base.bias.double() + 2.0 / (1 - p_used) * ((x2 * keep.double()) @ A.T) @ B.T
    ref.backward(g.double().reshape(-1, base.out_features))
    torch.testing.assert_close(y.double().reshape(-1, base.out_features), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), B.grad, rtol=1e-5, atol=1e-5)


def test_merges_over_4bit_base():
    layer = _lora_over_4bit(seed=2)
    with pytest.raises(NotImplementedError, match="quantized base"):
        layer.merge()
    A, B = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    W0 = layer.base_layer.dequantize().double()
    merged = merge_to_full_precision(layer)
    assert isinstance(merged, nn.Linear) and not merged.weight.requires_grad
    torch.testing.assert_close(merged.weight.double(), W0 + 2.0 * B @ A, rtol=0, atol=1e-6)
    x = torch.randn(4, 96)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    requantized, report = merge_and_requantize(layer)
    exact = W0 + 2.0 * B @ A
    exact = exact.detach()
    err = requantized.dequantize().double() - exact
    assert report["max_abs_error"] == pytest.approx(float(err.abs().max()), rel=1e-4)
    assert report["rel_frobenius_error"] == pytest.approx(float(err.norm() / exact.norm()), rel=1e-4)
    assert report["delta_rel_frobenius"] == pytest.approx(float((2.0 * B @ A).norm() / exact.norm()), rel=1e-4)
    assert 0 < report["rel_frobenius_error"] < 0.2
    with pytest.raises(TypeError, match="LoRA layer wrapping a Linear4bit"):
        merge_to_full_precision(nn.Linear(2, 2))


# -- whole models, bnb format -------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _bnb_config():
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def test_quantize_model_converts_all_linears_but_skipped_and_validates_first():
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight.*NaN/Inf"):
        quantize_model(model)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing half-converted
    model = quantize_model(_tiny_llama(), skip=("lm_head",))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
    assert kinds.pop("lm_head") == "Linear" and set(kinds.values()) == {"Linear4bit"} and len(kinds) == 14
    with pytest.raises(ValueError, match="power of two"):
        quantize_model(_tiny_llama(), block_size=48)


def test_loads_checkpoint_quantized_by_transformers_bitsandbytes(tmp_path):
    _tiny_llama().save_pretrained(tmp_path / "fp")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_bnb_config(),
                                                               device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    theirs.train()  # in eval mode bnb's CPU path repacks weights to bf16 (AVX512-BF16 kernel): ~1e-3 off
    config = transformers.AutoConfig.from_pretrained(tmp_path / "bnb")
    with empty_init():
        ours = transformers.AutoModelForCausalLM.from_config(config)
    load_quantized(ours, tmp_path / "bnb")
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-4, atol=1e-4)
    # our state dict round-trips the exact bytes of theirs
    mine, ref = ours.state_dict(), theirs.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    for suffix in ("", ".absmax", ".nested_absmax", ".quant_map", ".nested_quant_map"):
        assert torch.equal(mine[key + suffix], ref[key + suffix]), suffix
    # sharded like published "*-bnb-4bit" repos (a layer's quant state may sit in another shard)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    with empty_init():
        sharded = transformers.AutoModelForCausalLM.from_config(config)
    load_quantized(sharded, tmp_path / "sharded")
    with torch.no_grad():
        torch.testing.assert_close(sharded(IDS).logits, ours(IDS).logits, rtol=0, atol=0)


def test_checkpoint_saved_after_an_eval_forward_is_refused_at_load_naming_the_tensor(tmp_path):
    """transformers + bnb without double quant, saved after an eval-mode forward on CPU, store each absmax as
    bf16 (blocks per row, out_features). Before the fix load_quantized accepted that and the first forward
    failed with a shape error; now the load fails, naming the tensor, what was expected and what was found.
    The same model saved before any eval forward loads and matches bnb (the control)."""
    _tiny_llama().save_pretrained(tmp_path / "fp")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config,
                                                               device_map="cpu")
    theirs.save_pretrained(tmp_path / "good")
    theirs.eval()
    with torch.no_grad():
        theirs(IDS)
    theirs.save_pretrained(tmp_path / "corrupt")
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "corrupt" / "model.safetensors"))["model.layers.0.mlp.down_proj.weight.absmax"]
    assert stored.dtype == torch.bfloat16 and tuple(stored.shape) == (2, 64)  # the corruption this test is about
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "good")
    with empty_init():
        ours = transformers.AutoModelForCausalLM.from_config(hf_config)
    with pytest.raises(ValueError, match=r"model.layers.0.(self_attn|mlp).\w+.weight.absmax: expected float32 of "
                                         r"shape \(\d+,\) .*found bfloat16 of shape \(\d+, \d+\)\. This is the layout"):
        load_quantized(ours, tmp_path / "corrupt")
    with empty_init():
        ours = transformers.AutoModelForCausalLM.from_config(hf_config)
    load_quantized(ours, tmp_path / "good")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "good", device_map="cpu").train()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, rtol=1e-4, atol=1e-4)


def test_transformers_loads_what_loralab_saves(tmp_path):
    reference = _tiny_llama()
    model = quantize_model(_tiny_llama(), "nf4", double_quant=True)
    save_quantized(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    theirs.train()  # bnb's exact fp32 CPU path (eval mode switches to a bf16 kernel); dropout is 0
    assert sum(type(m).__name__ == "Linear4bit" and m.__module__.startswith("bitsandbytes")
               for m in theirs.modules()) == 14
    with torch.no_grad():
        ours_logits = model(IDS).logits
        torch.testing.assert_close(theirs(IDS).logits, ours_logits, rtol=1e-4, atol=1e-4)
        # and 4-bit is close to, but not equal to, full precision
        assert not torch.allclose(ours_logits, reference(IDS).logits, atol=1e-4)


def test_streaming_loader_never_materializes_full_precision_linears(tmp_path, monkeypatch):
    _tiny_llama().save_pretrained(tmp_path / "fp")
    expected = quantize_model(_tiny_llama(), "nf4", double_quant=True)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "fp")
    seen: list[int] = []
    original = Q.quantize_4bit
    state = {}

    def spying_quantize(*args, **kwargs):
        model = state["model"]
        seen.append(sum(1 for n, m in model.named_modules()
                        if type(m) is nn.Linear and n != "lm_head" and not m.weight.is_meta))
        return original(*args, **kwargs)

    def build():
        state["model"] = transformers.AutoModelForCausalLM.from_config(config)
        assert all(p.is_meta for p in state["model"].parameters())
        return state["model"]

    monkeypatch.setattr(quant_io, "quantize_4bit", spying_quantize)
    model = load_model_4bit(tmp_path / "fp", build, "nf4", double_quant=True)
    assert len(seen) == 14 and set(seen) == {0}  # no full-precision Linear weight ever materialized
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected(IDS).logits, rtol=1e-5, atol=1e-5)


def test_load_errors_name_the_tensor(tmp_path):
    model = quantize_model(_tiny_llama(), "nf4")
    state = model.state_dict()
    key = "model.layers.0.mlp.up_proj.weight.absmax"
    broken = {k: v for k, v in state.items() if k != key}
    with empty_init():
        target = _tiny_llama()
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight.absmax is missing"):
        load_quantized(target, broken)
    missing_norm = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with empty_init():
        target = _tiny_llama()
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_quantized(target, missing_norm)
    with pytest.raises(ValueError, match="no int4 format|bitsandbytes has no int4"):
        save_quantized(quantize_model(_tiny_llama(), "int4"), tmp_path / "x")
    fp = _tiny_llama()
    fp.save_pretrained(tmp_path / "fp")
    with empty_init():
        target = _tiny_llama()
    with pytest.raises(ValueError, match="lacks"):
        load_quantized_from_safetensors(target, {k: v for k, v in fp.state_dict().items() if "embed" not in k})


def test_streaming_loader_into_torch_meta_device_model(tmp_path):
    """Built under torch.device("meta"), computed buffers (rotary inv_freq) are rebuilt from the config."""
    _tiny_llama().save_pretrained(tmp_path / "fp")
    expected = quantize_model(_tiny_llama(), "nf4", double_quant=True)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "fp")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    load_quantized_from_safetensors(model, tmp_path / "fp", "nf4", double_quant=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, expected(IDS).logits, rtol=1e-5, atol=1e-5)


def test_merge_model_over_qlora_llama():
    from loralab.core.config import LoraConfig
    from loralab.core.inject import inject_adapter, lora_modules

    model = quantize_model(_tiny_llama(), "nf4", double_quant=True)
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B["default"].weight.normal_(0, 0.1)
        adapted = model(IDS).logits
    reports = merge_model(model)
    assert len(reports) == 4
    assert sum(type(m) is nn.Linear for m in model.modules()) == 1 + 4  # lm_head + merged q/v
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-4, atol=1e-4)


def test_cached_dequantize_is_bit_identical_and_released(monkeypatch):
    from loralab.core import linear4bit
    from loralab.core.linear4bit import Linear4bit, cached_dequantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    model = nn.Sequential(*(Linear4bit.from_linear(m) if isinstance(m, nn.Linear) else m for m in model))
    x = torch.randn(5, 64)
    expected = model(x)
    calls = []
    original = linear4bit.dequantize_4bit
    monkeypatch.setattr(linear4bit, "dequantize_4bit", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    with cached_dequantize(model):
        first, second = model(x), model(x)
    assert len(calls) == 2  # one rebuild per layer for the whole block, not per call
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all(getattr(m, "_weight_cache", None) is None for m in model)
    model(x)
    assert len(calls) == 4  # outside the block: rebuilt on every call again


def test_lora_inference_over_4bit_with_many_rows_matches_the_skinny_path():
    """The no-grad dense-update forward over a 4-bit base (rebuilt W + s B A) equals the training-path output."""
    from loralab.core.lora import LoraLinear

    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(96, 64), "nf4", double_quant=True)
    layer = LoraLinear(base)
    layer.update_layer("a", r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(200, 96)
    skinny = layer(x)  # A, B require grad: the fused training path
    with torch.no_grad():
        assert layer._fast_path_ok(x, (), {}) and layer._dense_update_pays(x, "a")
        dense = layer(x)
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    ref = x.double() @ (base.dequantize(torch.float32).double() + 2.0 * B @ A).T + base.bias.double()
    torch.testing.assert_close(dense.double(), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(dense, skinny, rtol=0, atol=1e-4)
