"""memory_report: every expected byte count below is hand-computed from shapes (numel * bytes/elem)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from loralab.core.memory import PACKED_4BIT, QUANT_STATE, memory_report
from loralab.core.optim import AdamW8bit, OffloadedOptimizer

FP32, BF16 = 4, 2


class _TinyLoraModel(nn.Module):
    """Embedding tied to the output head, an fp32 and a bf16 frozen Linear, a LoRA pair, a trainable
    Linear big enough (4096 weights) for 8-bit optimizer state, and a frozen fp32 buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.frozen32 = nn.Linear(16, 32)
        self.frozen16 = nn.Linear(32, 64, bias=False).to(torch.bfloat16)
        self.lora_A = nn.Parameter(torch.randn(4, 16))
        self.lora_B = nn.Parameter(torch.zeros(64, 4))
        self.head_in = nn.Linear(64, 64)  # trainable, 4096 weights + 64 bias
        self.head = nn.Linear(64, 100, bias=False)
        self.register_buffer("rope_cache", torch.zeros(10, 8))
        for module in (self.embed, self.frozen32, self.frozen16, self.head):
            module.requires_grad_(False)

    def forward(self, ids):
        h = self.embed(ids)
        x = self.frozen16(self.frozen32(h).to(torch.bfloat16)).float() + h @ self.lora_A.T @ self.lora_B.T
        return self.head(self.head_in(x))


def _frozen_fp32_bytes():
    return (100 * 16 + 16 * 32 + 32 + 100 * 64 + 10 * 8) * FP32


def test_roles_and_formats_before_and_after_a_step():
    torch.manual_seed(0)
    model = _TinyLoraModel()
    report = memory_report(model)
    trainable = (4 * 16 + 64 * 4 + 64 * 64 + 64) * FP32
    assert report.format_bytes("frozen base", "fp32") == _frozen_fp32_bytes()
    assert report.format_bytes("frozen base", "bf16") == 32 * 64 * BF16
    assert report.role_bytes("trainable") == trainable
    assert report.role_bytes("gradients") == 0 and report.role_bytes("optimizer") == 0

    opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randint(0, 100, (2, 5))).sum().backward()
    opt.step()
    report = memory_report(model, opt)
    assert report.role_bytes("gradients") == trainable
    # head_in.weight (4096 >= min_8bit_size): two uint8 code tensors + two fp32 absmax of 4096/256
    # blocks; the three small tensors keep two fp32 moments each.
    assert report.format_bytes("optimizer", "uint8") == 2 * 4096
    assert report.format_bytes("optimizer", "fp32") == 2 * 16 * FP32 + 2 * (64 + 64 + 256) * FP32
    total = _frozen_fp32_bytes() + 32 * 64 * BF16 + 2 * trainable + 2 * 4096 + 2 * (16 + 384) * FP32
    assert report.total_bytes == total
    text = str(report)
    assert "total" in text and f"{total / 2**20:.3f}" in text and "optimizer" in text


def test_tied_weights_counted_once_and_offloaded_state_counted():
    model = _TinyLoraModel()
    model.head.weight = model.embed.weight = nn.Parameter(torch.randn(100, 64), requires_grad=False)
    model.embed.embedding_dim = 64
    report = memory_report(model)
    assert report.format_bytes("frozen base", "fp32") == (100 * 64 + 16 * 32 + 32 + 10 * 8) * FP32
    opt = OffloadedOptimizer(torch.optim.AdamW, [model.lora_A, model.lora_B], lr=1e-3)
    model.lora_A.grad, model.lora_B.grad = torch.ones(4, 16), torch.ones(64, 4)
    opt.step()
    # torch AdamW: exp_avg + exp_avg_sq fp32 per param, plus a 0-d fp32 "step" tensor each
    assert memory_report(model, opt).format_bytes("optimizer", "fp32") == (2 * (64 + 256) + 2) * FP32


def test_meta_tensors_count_zero():
    with torch.device("meta"):
        model = nn.Linear(1000, 1000)
    assert memory_report(model).total_bytes == 0


def test_bitsandbytes_4bit_layer_packed_and_quant_state():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb = pytest.importorskip("bitsandbytes")
        layer = bnb.nn.Linear4bit(64, 128, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                                  compress_statistics=True).to("cpu")
    layer.bias.requires_grad_(False)
    report = memory_report(layer)
    assert report.format_bytes("frozen base", PACKED_4BIT) == 64 * 128 // 2
    # nested (double) quant: uint8 absmax per 64-block, 16-entry fp32 NF4 code, fp32 offset scalar,
    # fp32 absmax of the absmax per 256-block, 256-entry fp32 dynamic code
    blocks = 64 * 128 // 64
    expected = blocks * 1 + 16 * FP32 + FP32 + ((blocks + 255) // 256) * FP32 + 256 * FP32
    assert report.format_bytes("frozen base", QUANT_STATE) == expected
    assert report.format_bytes("frozen base", "fp32") == 128 * FP32  # the bias


@pytest.mark.parametrize("double_quant", [True, False])
def test_loralab_linear4bit_under_lora(double_quant):
    linear4bit = pytest.importorskip("loralab.core.linear4bit")
    from loralab.core.config import LoraConfig
    from loralab.core.inject import inject_adapter

    model = nn.Sequential()
    model.add_module("proj", linear4bit.Linear4bit.from_linear(nn.Linear(64, 128), double_quant=double_quant))
    inject_adapter(model, LoraConfig(r=4, lora_alpha=4, target_modules=["proj"]))
    report = memory_report(model)
    blocks = 64 * 128 // 64
    # double quant: uint8 absmax per 64-block + fp32 absmax per 256 of them + 256-entry fp32 map + fp32
    # offset; plain: fp32 absmax per 64-block. Both: 16-entry fp32 NF4 code.
    absmax = blocks + ((blocks + 255) // 256) * FP32 + 256 * FP32 + FP32 if double_quant else blocks * FP32
    assert report.format_bytes("frozen base", PACKED_4BIT) == 64 * 128 // 2
    assert report.format_bytes("frozen base", QUANT_STATE) == absmax + 16 * FP32
    assert report.format_bytes("frozen base", "fp32") == 128 * FP32  # frozen bias, full precision
    assert report.role_bytes("trainable") == (4 * 64 + 128 * 4) * FP32


def test_streamed_4bit_model_with_tied_embeddings_counts_embedding_once(tmp_path):
    """bf16 checkpoint streamed into an fp32 meta model: the tied lm_head must stay the embedding
    (one fp32 copy), not become a second converted copy."""
    transformers = pytest.importorskip("transformers")
    quant_io = pytest.importorskip("loralab.core.quant_io")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = quant_io.load_model_4bit(
        tmp_path, lambda: transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    model.requires_grad_(False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = memory_report(model)
    # fp32: embedding (tied head) + 2 decoder norms + final norm + rotary inv_freq, original_inv_freq
    # (head_dim 16 -> 8 frequencies each)
    assert report.format_bytes("frozen base", "fp32") == (256 * 64 + 3 * 64 + 2 * 8) * FP32
    linears = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o, k, v, gate, up, down
    assert report.format_bytes("frozen base", PACKED_4BIT) == linears // 2
