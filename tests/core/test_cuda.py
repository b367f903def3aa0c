"""The core on a CUDA device: 4-bit quantization, Linear4bit, LoRA layers and QLoRA training.

Skipped without CUDA (CI has none); run where a GPU is lent. References are independent of the GPU
code: the CPU implementation (itself bit-exact with bitsandbytes' CPU kernels), bitsandbytes' own
CUDA kernels when bitsandbytes is importable there, and float64 formulas on the CPU. TF32 is switched
off so that fp32 matmuls on the GPU are true fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loralab.core import quant as Q
from loralab.core import dequant as DQ
from loralab.core import quant_state as QS
from loralab.core.config import LoraConfig
from loralab.core.inject import inject_adapter, lora_modules, merge_adapters, unmerge_adapters
from loralab.core.linear4bit import Linear4bit, quantize_model
from loralab.core.lora import LoraLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _true_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3).to(dtype)


def _state_tensors(state: QS.QuantState) -> dict[str, torch.Tensor]:
    names = ("absmax", "code", "offset", "nested_absmax", "nested_code")
    return {k: getattr(state, k) for k in names if getattr(state, k, None) is not None}


SHAPES = [(257, 131), (512, 1024), (3,), (2, 64)]  # partial last block, several chunks, one short block, + zeros


def _shape_weights(shape, dtype):
    w = _weights(shape, dtype, seed=shape[0])
    if shape == (2, 64):
        w[1] = 0  # an all-zero block
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_quantization_equals_bitsandbytes_cuda_kernels(dtype):
    """On a GPU loralab follows bnb's CUDA kernel (quant_cuda.py): same bytes, scales, nested scales and
    offset, and dequantization equal to bnb's CUDA dequantization bit for bit. All mismatches are listed."""
    F = pytest.importorskip("bitsandbytes.functional")
    mismatches = []
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            for shape in SHAPES:
                case = (quant_type, double_quant, shape)
                w = _shape_weights(shape, dtype).to(CUDA)
                packed, state = Q.quantize_4bit(w, quant_type, 64, double_quant)
                ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                        compress_statistics=double_quant)
                pairs = [("packed", packed.view(-1), ref_packed.view(-1)), ("absmax", state.absmax, ref_state.absmax)]
                if double_quant:
                    pairs += [("nested_absmax", state.nested_absmax, ref_state.state2.absmax),
                              ("offset", state.offset.reshape(()), ref_state.offset.reshape(()))]
                for name, ours, theirs in pairs:
                    if not torch.equal(ours, theirs.to(ours.dtype)):
                        bad = int((ours.reshape(-1) != theirs.reshape(-1).to(ours.dtype)).sum())
                        mismatches.append((case, name, f"{bad} of {ours.numel()}"))
                ours = DQ.dequantize_4bit(ref_packed.view(-1, 1), _loralab_state(ref_state, quant_type), dtype)
                theirs = F.dequantize_4bit(ref_packed, ref_state)
                if not torch.equal(ours, theirs):
                    mismatches.append((case, "dequantize", int((ours != theirs).sum())))
                cpu = DQ.dequantize_4bit(packed.cpu(), _state_to(state, "cpu"), torch.float32)
                if not torch.equal(DQ.dequantize_4bit(packed, state, torch.float32).cpu(), cpu):
                    mismatches.append((case, "GPU decode != CPU decode of the same bytes", None))
    assert not mismatches, mismatches


def _state_to(state: QS.QuantState, device) -> QS.QuantState:
    moved = QS.QuantState(state.quant_type, state.block_size, state.shape, state.dtype, state.absmax.to(device),
                         state.code.to(device))
    if state.double_quant:
        moved.offset, moved.nested_absmax = state.offset.to(device), state.nested_absmax.to(device)
        moved.nested_code, moved.nested_block_size = state.nested_code.to(device), state.nested_block_size
    return moved


def _loralab_state(bnb_state, quant_type: str) -> QS.QuantState:
    """bnb's QuantState object as loralab's (same tensors)."""
    state = QS.QuantState(quant_type, bnb_state.blocksize, tuple(bnb_state.shape), bnb_state.dtype,
                         bnb_state.absmax, QS.codebook(quant_type).to(bnb_state.absmax.device))
    if bnb_state.nested:
        state.offset, state.nested_absmax = bnb_state.offset, bnb_state.state2.absmax
        state.nested_code, state.nested_block_size = bnb_state.state2.code, bnb_state.state2.blocksize
    return state


def test_int4_on_cuda_equals_the_cpu_and_fast_reciprocal_is_within_one_ulp():
    from loralab.core import quant_cuda

    w = _weights((300, 70), torch.float32)
    packed, state = Q.quantize_4bit(w.to(CUDA), "int4", 64, double_quant=False)  # no bnb kernel: CPU rules
    ref_packed, ref_state = Q.quantize_4bit(w, "int4", 64, double_quant=False)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(state.absmax.cpu(), ref_state.absmax)
    x = torch.rand(1 << 20, device=CUDA) * 10 + 1e-3
    fast = quant_cuda.reciprocal(x)
    assert quant_cuda._rcp_fn not in (None, False), "jiterator could not build the fast reciprocal"
    ieee = torch.reciprocal(x)
    ulps = (fast.view(torch.int32).long() - ieee.view(torch.int32).long()).abs()
    print(f"fast reciprocal: {int((ulps > 0).sum())} of {x.numel()} differ from IEEE, max {int(ulps.max())} ulp")
    assert int(ulps.max()) <= 1


def test_linear4bit_moves_to_cuda_and_matches_the_float64_formula():
    lin = nn.Linear(192, 80)
    q = Linear4bit.from_linear(lin, "nf4", double_quant=True)
    w_hat = q.dequantize().double()  # CPU decode: the reference weight
    q = q.to(CUDA)
    assert q.weight.dtype == torch.uint8 and q.absmax.device.type == "cuda"
    x = torch.randn(4, 7, 192, dtype=torch.float32, device=CUDA, requires_grad=True)
    y = q(x)
    ref = x.detach().cpu().double() @ w_hat.T + lin.bias.double()
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx.cpu().double(), g.cpu().double() @ w_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("enable", [None, [True, False, True]], ids=["plain", "qkv-slices"])
@pytest.mark.parametrize("base_kind", ["linear", "4bit"])
def test_lora_layer_on_cuda_forward_backward_against_float64(enable, base_kind):
    base = nn.Linear(96, 144).requires_grad_(False)
    if base_kind == "4bit":
        base = Linear4bit.from_linear(base, "nf4", double_quant=True)
    w0 = (base.dequantize() if base_kind == "4bit" else base.weight).detach().double()
    bias = base.bias.detach().double()
    layer = LoraLinear(base)
    layer.update_layer("a", r=4, lora_alpha=8, enable=enable)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.5)
    delta = layer.delta_weight("a").detach().double()  # dense reference update on the CPU, float64
    layer = layer.to(CUDA)
    x = torch.randn(3, 50, 96, device=CUDA, requires_grad=True)
    assert layer._fast_path_ok(x, (), {})
    y = layer(x)
    x64 = x.detach().cpu().double()
    torch.testing.assert_close(y.detach().cpu().double(), x64 @ (w0 + delta).T + bias, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), g)
    # float64 autograd reference through the generic formula on the CPU
    ref_layer = copy.deepcopy(layer).cpu().double() if base_kind == "linear" else None
    if ref_layer is not None:
        x_ref = x64.clone().requires_grad_(True)
        y_ref = ref_layer._forward_generic(x_ref)
        refs = torch.autograd.grad(y_ref, (x_ref, ref_layer.lora_A["a"].weight, ref_layer.lora_B["a"].weight),
                                   g.cpu().double())
        for got, ref in zip((gx, gA, gB), refs):
            torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-4, atol=1e-4)
    else:  # 4-bit: dL/dx = g (W0 + delta) exactly as the formula says
        torch.testing.assert_close(gx.cpu().double(), g.cpu().double() @ (w0 + delta), rtol=1e-4, atol=1e-4)
        assert gA.abs().sum() > 0 and gB.abs().sum() > 0


def test_dropout_on_cuda_only_on_lora_input_at_the_right_rate():
    p, n = 0.25, 64
    base = nn.Linear(n, n).requires_grad_(False)
    layer = LoraLinear(base)
    layer.update_layer("d", r=n, lora_alpha=n, lora_dropout=p)  # scaling 1, A = B = I below
    with torch.no_grad():
        layer.lora_A["d"].weight.copy_(torch.eye(n))
        layer.lora_B["d"].weight.copy_(torch.eye(n))
    layer = layer.to(CUDA).train()
    x = torch.randn(4000, n, device=CUDA)
    delta = layer(x) - base.to(CUDA)(x)
    kept = (delta - x / (1 - p)).abs() < 1e-5
    dropped = delta.abs() < 1e-6
    assert torch.all(kept | dropped)
    assert abs(dropped.float().mean().item() - p) < 0.01


def test_merge_unmerge_on_cuda_round_trip():
    base = nn.Linear(64, 48)
    layer = LoraLinear(base)
    layer.update_layer("a", r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    layer = layer.to(CUDA)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(10, 64, device=CUDA)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def _tiny_llama(hidden=64):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_training_on_cuda_tracks_the_cpu_run_and_learns(compute_dtype):
    """A few AdamW steps of QLoRA on a tiny Llama: the GPU run (fp32 compute) follows the CPU run to fp32
    round-off; in bf16 compute the loss still falls and the adapter (not the base) changes."""
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))

    def run(device):
        model = quantize_model(_tiny_llama(), "nf4", double_quant=True, compute_dtype=compute_dtype,
                               skip_modules=["lm_head"])
        model.requires_grad_(False)
        inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        model.to(device)
        packed = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        x = ids.to(device)
        for _ in range(8):
            with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        for n, b in model.named_buffers():
            if b.dtype == torch.uint8:
                assert torch.equal(b, packed[n]), f"the 4-bit base changed: {n}"
        return losses, {n: p.detach().cpu().float() for n, p in model.named_parameters() if p.requires_grad}

    gpu_losses, gpu_params = run(CUDA)
    assert gpu_losses[-1] < gpu_losses[0] - 0.05, gpu_losses
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in gpu_params.items())
    if compute_dtype == torch.float32:
        cpu_losses, cpu_params = run(torch.device("cpu"))
        torch.testing.assert_close(torch.tensor(gpu_losses), torch.tensor(cpu_losses), rtol=1e-4, atol=1e-4)
        for n in cpu_params:
            torch.testing.assert_close(gpu_params[n], cpu_params[n], rtol=1e-3, atol=1e-4)


def test_adapter_trained_on_cuda_saves_and_loads_on_cpu(tmp_path):
    from loralab.core.adapter_io import load_adapter, save_adapter

    model = _tiny_llama()
    reference = copy.deepcopy(model)
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    model.to(CUDA)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        gpu_logits = model(input_ids=ids.to(CUDA)).logits.cpu()
        merge_adapters(model)
        merged_logits = model(input_ids=ids.to(CUDA)).logits.cpu()
        unmerge_adapters(model)
    torch.testing.assert_close(merged_logits, gpu_logits, rtol=1e-4, atol=1e-4)
    save_adapter(model, tmp_path / "ad")
    loaded = load_adapter(reference, tmp_path / "ad")
    with torch.no_grad():
        cpu_logits = loaded(input_ids=ids).logits
    torch.testing.assert_close(cpu_logits, gpu_logits, rtol=1e-4, atol=1e-4)
