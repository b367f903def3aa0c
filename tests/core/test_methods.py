"""The method entry point: counts by kind vs formulas, save/load round trips, merge, refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file

from loralab.core.methods import KINDS, METHODS, apply_method, load_method, merge_method, save_method
from loralab.models.tiny import ARCHS, tiny_model

L, D = 2, 32
SETTINGS = {
            "adapter_h": {"r": 4}, "adapter_l": {"r": 4}, "adapter_p": {"r": 4}, "prefix_layer": {"l_p": 3},
            "prefix_embed": {"l_p": 2, "l_i": 3}, "ft_top2": {"k": 1}, "bitfit": {}, "full": {}}
# The paper's formulas on the tiny config (L = 2, d = 32, r = 4; PreLayer l_p = 3 as K and V: 2·L·d·l_p;
# PreEmbed l_p = 2, l_i = 3: d·(l_p + l_i)):
FORMULA = {"adapter_h": 2 * L * (2 * D * 4 + 4 + D), "adapter_l": L * (2 * D * 4 + 4 + D) + 2 * L * D,
           "adapter_p": L * (2 * D * 4 + 4 + D), "prefix_layer": 2 * L * D * 3, "prefix_embed": D * (2 + 3)}


def _batch():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": torch.randint(5, 100, (2, 7), generator=g), "attention_mask": mask}


def _randomise(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _model(arch):
    return tiny_model(arch, "seq_cls")


def _settings(method, arch):
    if method == "lora":  # the head trains with LoRA as a module to save. Explicit targets: with "all-linear",
        # adapter_io.load_adapter drops a nested head (RoBERTa's classifier.dense/out_proj) from
        # modules_to_save and adapts its Linears instead (a bug there, reported; not this module's)
        targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}.get(arch, ["query", "value"])
        return {"target_modules": targets, "modules_to_save": ["score" if arch in ("gpt2", "llama") else "classifier"]}
    return SETTINGS[method]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(FORMULA))
def test_counts_equal_the_formula_and_the_model(arch, method):
    model = _model(arch)
    head = sum(p.numel() for p in getattr(model, "classifier", getattr(model, "score", None)).parameters())
    result = apply_method(model, method, **_settings(method, arch))
    expected = FORMULA[method] // 2 if (arch == "llama" and method == "prefix_layer") else FORMULA[method]
    assert result["formula"]["count"] == expected  # Llama: 2 K/V heads of 8, d_kv = 16
    assert result["trainable"] == expected + head == sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = "adapter" if method.startswith("adapter") else "prefix"
    assert result["by_kind"][kind]["trainable"] == expected and result["by_kind"]["head"]["trainable"] == head
    if method == "prefix_layer":
        assert result["formula"]["paper"] == L * D * 3 and result["formula"]["kv"] == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_count_by_kind_is_a_disjoint_cover(arch):
    for method in METHODS:
        model = _model(arch)
        if method == "bitfit" and not any(n.endswith(".bias") for n, _ in model.named_parameters()):
            with pytest.raises(ValueError, match="has no bias parameters to train"):  # Llama: no biases
                apply_method(model, method, **_settings(method, arch))
            continue
        result = apply_method(model, method, **_settings(method, arch))
        unique = {id(p): p for p in model.parameters()}.values()
        assert result["total"] == sum(p.numel() for p in unique)
        assert result["trainable"] == sum(p.numel() for p in unique if p.requires_grad)
        assert set(result["by_kind"]) == set(KINDS)
        assert sum(v["total"] for v in result["by_kind"].values()) == result["total"]
        json.loads(json.dumps(result))  # the --dry-run prints it as one JSON object


def test_ft_top_and_bitfit_counts():
    model = tiny_model("bert", "seq_cls", num_hidden_layers=3)
    top = sum(p.numel() for p in model.bert.encoder.layer[1:].parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    result = apply_method(model, "ft_top2")
    assert result["trainable"] == top + head == result["formula"]["count"] + head
    assert not any(p.requires_grad for p in model.bert.encoder.layer[0].parameters())
    model = tiny_model("bert", "seq_cls")
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))  # the head's too
    assert apply_method(model, "bitfit", head=[])["trainable"] == biases


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_save_load_round_trip_gives_identical_outputs(arch, method, tmp_path):
    model = _model(arch)
    if method == "bitfit" and arch == "llama":
        pytest.skip("Llama has no biases: BitFit is refused (test_count_by_kind_is_a_disjoint_cover)")
    apply_method(model, method, **_settings(method, arch))
    _randomise(model)
    out = model(**_batch()).logits
    save_method(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config.get("method", "lora") == method or config.get("peft_type") == "LORA"
    fresh = _model(arch)
    load_method(fresh, tmp_path)
    torch.testing.assert_close(fresh(**_batch()).logits, out, rtol=0, atol=0)
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_reparametrised_prefixes_are_saved_merged(tmp_path):
    model = _model("gpt2")
    apply_method(model, "prefix_layer", l_p=3, reparam=True, reparam_dim=8, reparam_hidden=16)
    _randomise(model)
    out = model(**_batch()).logits
    save_method(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["reparam"] is False and config["merged_reparametrization"] is True
    assert not any("reparam" in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    fresh = _model("gpt2")
    load_method(fresh, tmp_path, trainable=False)
    torch.testing.assert_close(fresh(**_batch()).logits, out)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_merge():
    for method in ("adapter_h", "adapter_l", "adapter_p", "prefix_layer", "prefix_embed"):
        model = _model("bert")
        apply_method(model, method, **_settings(method, "bert"))
        with pytest.raises(NotImplementedError, match="cannot be merged into the base weights"):
            merge_method(model)
    model = _model("bert")
    apply_method(model, "lora", **_settings("lora", "bert"))
    _randomise(model)
    out = model(**_batch()).logits
    merge_method(model)
    torch.testing.assert_close(model(**_batch()).logits, out, atol=1e-5, rtol=1e-5)
    model = _model("bert")
    apply_method(model, "ft_top2")
    merge_method(model)  # nothing to merge: the trained weights are the model's own


def test_refusals(tmp_path):
    model = _model("gpt2")
    apply_method(model, "adapter_h", r=4)
    for second in ("adapter_p", "prefix_layer", "lora", "ft_top2"):
        with pytest.raises(ValueError, match="already has method 'adapter_h'"):
            apply_method(model, second)
    lora = _model("gpt2")
    apply_method(lora, "lora", target_modules=["c_attn"])
    with pytest.raises(ValueError, match="one method per model"):
        apply_method(lora, "prefix_layer")
    from loralab.core.config import LoraConfig
    from loralab.core.inject import inject_adapter
    raw = _model("gpt2")
    inject_adapter(raw, LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="has LoRA adapters"):
        apply_method(raw, "adapter_h")
    with pytest.raises(ValueError, match="unknown method"):
        apply_method(_model("gpt2"), "adapter_x")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['rank'\]"):
        apply_method(_model("gpt2"), "adapter_h", rank=4)
    with pytest.raises(ValueError, match="k must be in"):
        apply_method(_model("gpt2"), "ft_top2", k=5)
    full = _model("gpt2")
    apply_method(full, "full")
    with pytest.raises(NotImplementedError, match="save_pretrained"):
        save_method(full, tmp_path / "full")
    save_method(model, tmp_path / "h")
    with pytest.raises(ValueError, match="already has method"):
        load_method(model, tmp_path / "h")
    with pytest.raises(ValueError, match="does not fit"):
        load_method(_model("llama"), tmp_path / "h")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_method(_model("gpt2"), tmp_path / "nothing")
