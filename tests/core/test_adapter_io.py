"""Adapter files: PEFT format both ways (identical logits), round trips, warm start, loud failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.core.adapter_io import export_peft, load_adapter, read_config, save_adapter
from loralab.core.config import LoraConfig
from loralab.core.inject import inject_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=97, num_labels=3)
        return transformers.BertForSequenceClassification(cfg).eval()
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}
IDS = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_loralab_adapter_loads_in_peft_with_identical_logits(tmp_path, arch):
    model = tiny(arch)
    save = ["classifier"] if arch == "bert" else None
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], modules_to_save=save))
    randomize(model)
    ours = logits(model)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny(arch), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, logits(tiny(arch)), atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_peft_adapter_loads_in_loralab_with_identical_logits(tmp_path, arch):
    save = ["classifier"] if arch == "bert" else None
    pm = peft.get_peft_model(tiny(arch), peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[arch],
                                                         modules_to_save=save, fan_in_fan_out=arch == "gpt2"))
    randomize(pm)
    expected = logits(pm.eval())
    pm.save_pretrained(tmp_path)
    model = load_adapter(tiny(arch), tmp_path)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_round_trip_and_warm_start_is_trainable_equal_and_nonzero(tmp_path):
    model = tiny("bert")
    inject_adapter(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                     bias="lora_only"))
    randomize(model)
    save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    fresh = load_adapter(tiny("bert"), tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    trained = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    assert len(lora_b) == 4 and all(p.abs().sum() > 0 for p in lora_b)  # not a fresh zero adapter
    assert any("classifier.modules_to_save" in n for n in trained)
    assert any(n.endswith("query.base_layer.bias") for n in trained)  # bias="lora_only" trains on
    assert len(saved) == sum(1 for _ in trained)
    # one optimizer step changes the loaded weights: the warm start is not frozen
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.SGD(trained.values(), lr=0.1)
    fresh.train()
    fresh(input_ids=IDS, labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in trained.items() if "lora_" in n)


def test_load_frozen_for_inference(tmp_path):
    model = tiny("bert")
    inject_adapter(model, LoraConfig(r=2, target_modules=["query"]))
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny("bert"), tmp_path, trainable=False)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_fused_qkv_saves_loralab_form_and_exports_exact_peft(tmp_path):
    model = tiny("gpt2")
    inject_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=None, fused_qkv={"c_attn": [True, False, True]}))
    randomize(model)
    ours = logits(model)
    save_adapter(model, tmp_path / "native")
    assert read_config(tmp_path / "native").fused_qkv == {"c_attn": [True, False, True]}
    again = load_adapter(tiny("gpt2"), tmp_path / "native")
    torch.testing.assert_close(logits(again), ours, rtol=0, atol=0)
    export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny("gpt2"), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)
    B = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (96, 4) and B[32:64].abs().sum() == 0  # the k slice stays untouched


def test_errors_are_loud_and_name_the_problem(tmp_path):
    model = tiny("bert")
    inject_adapter(model, LoraConfig(r=4, target_modules=["query"]))
    save_adapter(model, tmp_path / "a")
    # a base without the target modules
    with pytest.raises(ValueError, match="matched no module.*Candidate"):
        load_adapter(tiny("llama"), tmp_path / "a")
    # shape mismatch: the file says r=4, the config says r=2
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes((tmp_path / "a" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"query.lora_A.weight has shape \(4, 32\) in the file but \(2, 32\)"):
        load_adapter(tiny("bert"), tmp_path / "b")
    # missing and unexpected keys
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors["base_model.model.bert.pooler.dense.lora_A.weight"] = tensors.pop(first)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "c" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*unexpected keys.*pooler"):
        load_adapter(tiny("bert"), tmp_path / "c")
    # unknown config field from a newer format, and a PEFT feature we do not implement
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "hyper_lora": 3}))
    with pytest.raises(ValueError, match="unknown config field 'hyper_lora'"):
        load_adapter(tiny("bert"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(tiny("bert"), tmp_path / "a")
    # pickles are never read
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        load_adapter(tiny("bert"), tmp_path / "d")
