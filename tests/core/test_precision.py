"""core.precision: the auto rule, which parameters cast_frozen casts, and the autocast context."""
import pytest
import torch
from torch import nn

from loralab.core.config import LoraConfig
from loralab.core.inject import inject_adapter
from loralab.core.precision import cast_frozen, compute_context, resolve_compute_dtype


@pytest.mark.parametrize("amx, avx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                (False, False, torch.float32)])
def test_auto_follows_the_cpu_flags(monkeypatch, amx, avx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx)
    dtype, reason = resolve_compute_dtype("auto", "cpu")
    assert dtype == expected
    assert reason.startswith("auto: CPU has") and ("neither" in reason) == (expected == torch.float32)


def test_explicit_settings_and_a_bad_name():
    assert resolve_compute_dtype("float32")[0] == torch.float32
    assert resolve_compute_dtype("bfloat16")[0] == torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype must be"):
        resolve_compute_dtype("fp16")


def test_cast_frozen_casts_frozen_parameters_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3))
    model.register_buffer("inv_freq", torch.rand(4))
    model.requires_grad_(False)
    inject_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["2"]))
    model[3].requires_grad_(True)  # a trainable head
    model[3].to(torch.bfloat16)  # (say, loaded in bf16): must come back to float32 for the optimizer
    counts = cast_frozen(model, torch.bfloat16)
    frozen = 10 * 8 + 2 * 8 + 8 * 8 + 8
    assert counts == {"frozen_cast": frozen, "trainable_float32": 8 * 3 + 3}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert model.inv_freq.dtype == torch.float32  # buffers are left alone
    assert cast_frozen(model, torch.bfloat16) == {"frozen_cast": 0, "trainable_float32": 0}  # idempotent


def test_compute_context():
    with compute_context(torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with compute_context(torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def test_bitfit_in_bf16_keeps_each_layernorm_in_one_dtype_and_runs():
    """BitFit trains LayerNorm biases: cast_frozen keeps such a LayerNorm's frozen weight in float32 beside
    its trainable bias (layer_norm needs one dtype for both; autocast does not cast them), the big frozen
    weights still go to bf16, and the forward and backward under bf16 autocast run and match float32."""
    import torch

    from loralab.core.methods import apply_method
    from loralab.core.precision import cast_frozen, compute_context
    from loralab.models.tiny import tiny_model

    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = tiny_model("bert", "seq_cls", seed=0)
    apply_method(ref, "bitfit", head=["classifier"])
    want = ref(input_ids=ids).logits
    model = tiny_model("bert", "seq_cls", seed=0)
    apply_method(model, "bitfit", head=["classifier"])
    cast_frozen(model, torch.bfloat16)
    norm = model.bert.encoder.layer[0].output.LayerNorm
    assert norm.bias.requires_grad and norm.weight.dtype == norm.bias.dtype == torch.float32
    assert model.bert.encoder.layer[0].output.dense.weight.dtype == torch.bfloat16
    with compute_context(torch.bfloat16):
        logits = model(input_ids=ids).logits
    logits.float().sum().backward()
    assert norm.bias.grad is not None and torch.isfinite(norm.bias.grad).all()
    torch.testing.assert_close(logits.float(), want, atol=0.05, rtol=0.05)  # bf16 rounding only
