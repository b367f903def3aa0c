"""generate_batched's two backends: loralab's (merged copy + own beam search) gives transformers' tokens in
float32 on an adapted model, leaves the model as it was, decodes in the dtype asked for, and hands
methods that cannot be merged (bottleneck adapters) to transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GenerationConfig

from loralab.core.adapters import add_adapters
from loralab.core.config import LoraConfig
from loralab.core.inject import inject_adapter, lora_modules
from loralab.models.tiny import tiny_model
from loralab.tasks.common import beam as beam_module
from loralab.tasks.common.generation import generate_batched

PROMPTS = [[5, 9, 33, 40, 41], [7, 8], [60, 61, 62, 63, 64, 65, 66, 67], [90, 3, 90]]


def _adapted(arch: str) -> nn.Module:
    model = tiny_model(arch, "causal_lm", seed=5)
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(2)
    for _, layer in lora_modules(model):
        for B in layer.lora_B.values():
            nn.init.normal_(B.weight, std=0.3)
    return model.train()


def _config(beams: int, eos: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=10, num_beams=beams, do_sample=False, no_repeat_ngram_size=2,
                            eos_token_id=eos, pad_token_id=eos, length_penalty=0.9, early_stopping=False,
                            repetition_penalty=1.0, min_new_tokens=0, num_return_sequences=1, use_cache=True)


@pytest.mark.parametrize("arch,eos", [("llama", 2), ("gpt2", 0)])
@pytest.mark.parametrize("beams", [1, 4])
def test_loralab_backend_gives_transformers_tokens_in_float32(arch, eos, beams):
    model = _adapted(arch)
    args = (PROMPTS, _config(beams, eos), eos, [eos], 3)
    ours = generate_batched(model, *args, backend="loralab", dtype="float32")
    reference = generate_batched(model, *args, backend="transformers")
    assert ours == reference and any(ours)


def test_decoding_leaves_the_model_as_it_was():
    model = _adapted("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate_batched(model, PROMPTS, _config(3, 2), 2, [2], 2, dtype="bfloat16")
    assert model.training and all(not layer.merged for _, layer in lora_modules(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)


def test_the_decoding_copy_has_the_dtype_asked_for(monkeypatch):
    seen = []
    real = beam_module.beam_search

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(beam_module, "beam_search", spy)
    model = _adapted("llama")
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
        generate_batched(model, PROMPTS[:2], _config(2, 2), 2, [2], 2, dtype=dtype)
        assert seen[-1] == expected
    with pytest.raises(ValueError, match="generate.backend"):
        generate_batched(model, PROMPTS, _config(2, 2), 2, [2], 2, backend="hf")


def test_bottleneck_adapters_are_decoded_by_transformers(monkeypatch):
    model = tiny_model("llama", "causal_lm", seed=0)
    add_adapters(model, "adapter_h", r=4)
    calls = []
    monkeypatch.setattr(beam_module, "beam_search", lambda *a, **k: calls.append("loralab"))
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append("transformers") or real_generate(**kw))
    rows = generate_batched(model, PROMPTS, _config(3, 2), 2, [2], 4)
    assert calls == ["transformers"] and len(rows) == len(PROMPTS)
