"""End to end on adapters written by loralab's own save_adapter/export_peft for tiny transformers models:
ΔW from ``analyze delta-w`` equals (merged weight − base weight), the model's own answer, including GPT-2's
Conv1D layout, fused per-slice c_attn, rsLoRA and patterns."""

from __future__ import annotations

import pytest
import torch

from loralab.analysis.delta_w import run_delta_w
from loralab.analysis.subspace import run_subspace
from loralab.core.adapter_io import export_peft, save_adapter
from loralab.core.config import LoraConfig
from loralab.core.inject import inject_adapter, merge_adapters

transformers = pytest.importorskip("transformers")


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def adapted(arch: str, cfg: LoraConfig, seed: int):
    model = tiny(arch)
    inject_adapter(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def merged_deltas(model, names: list[str]) -> dict[str, torch.Tensor]:
    """(out x in) W_merged - W0 per module, via loralab's own merge."""
    get = lambda: {n: model.get_submodule(n).base_layer.weight.detach().double().clone() for n in names}
    before = get()
    merge_adapters(model)
    after = get()
    conv = {n: type(model.get_submodule(n).base_layer).__name__ == "Conv1D" for n in names}
    return {n: (after[n] - before[n]).T if conv[n] else after[n] - before[n] for n in names}


@pytest.mark.parametrize("arch,cfg", [
    ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                         rank_pattern={"down_proj": 2}, alpha_pattern={r"model\.layers\.1\..*": 3.0})),
    ("gpt2", LoraConfig(r=2, lora_alpha=8, target_modules=["c_proj", "c_fc"])),
])
def test_delta_norm_equals_merge(tmp_path, arch, cfg):
    model = adapted(arch, cfg, 1)
    save_adapter(model, tmp_path / "ad")
    tiny(arch).save_pretrained(tmp_path / "base", safe_serialization=True)
    res = run_delta_w(tmp_path / "ad", tmp_path / "base", tmp_path / "out", n_random=2)["modules"]
    deltas = merged_deltas(model, list(res))
    assert len(res) >= 4
    for name, e in res.items():
        assert e["delta_norm"] == pytest.approx(float(torch.linalg.norm(deltas[name])), rel=1e-5), name
        assert e["rank_delta"] == e["rank"]
        assert e["transposed"] == (arch == "gpt2")


def test_gpt2_fused_slices_match_merge_rows(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=None, fused_qkv={"c_attn": [True, False, True]})
    model = adapted("gpt2", cfg, 2)
    save_adapter(model, tmp_path / "native")
    export_peft(model, tmp_path / "peft")
    tiny("gpt2").save_pretrained(tmp_path / "base", safe_serialization=True)
    res = run_delta_w(tmp_path / "native", tmp_path / "base", tmp_path / "o1", n_random=0)["modules"]
    assert sorted(res) == [f"transformer.h.{i}.attn.c_attn[{s}]" for i in range(2) for s in (0, 2)]
    exported = run_delta_w(tmp_path / "peft", tmp_path / "base", tmp_path / "o2", n_random=0)["modules"]
    assert exported["transformer.h.0.attn.c_attn"]["rank"] == 4  # export_peft's equivalent rank r·k
    deltas = merged_deltas(model, ["transformer.h.0.attn.c_attn"])["transformer.h.0.attn.c_attn"]
    for s in (0, 2):
        assert res[f"transformer.h.0.attn.c_attn[{s}]"]["delta_norm"] == pytest.approx(
            float(torch.linalg.norm(deltas[32 * s:32 * (s + 1)])), rel=1e-5)
    total = float(torch.linalg.norm(deltas))
    assert exported["transformer.h.0.attn.c_attn"]["delta_norm"] == pytest.approx(total, rel=1e-5)
    # the native slices and the exported block adapter see the same input subspaces
    sub = run_subspace(tmp_path / "native", tmp_path / "native", tmp_path / "o3", plots=False)["modules"]
    assert sub["transformer.h.1.attn.c_attn[2]"]["phi"][1][1] == pytest.approx(1.0)


def test_subspace_between_two_loralab_adapters(tmp_path):
    cfg8 = LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg64 = LoraConfig(r=6, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_adapter(adapted("llama", cfg8, 3), tmp_path / "r2")
    save_adapter(adapted("llama", cfg64, 4), tmp_path / "r6")
    res = run_subspace(tmp_path / "r2", tmp_path / "r6", tmp_path / "out", modules="q_proj", plots=False)
    assert sorted(res["modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    e = res["modules"]["model.layers.0.self_attn.q_proj"]
    assert (e["r_a"], e["r_b"]) == (2, 6) and len(e["phi"]) == 2 and len(e["phi"][0]) == 6
