"""E2E with the paper's other methods on a tiny Llama (and GPT-2, the paper's model): two training steps
through the runner, counts by kind in results.json equal to the written-out formulas, the saved dir
reloads to the same logits; prefix_layer's baseline is the base model (its fresh prefixes are not);
prefix_embed is refused with the reason (no incremental decoding)."""
import json

import pytest
import torch

from loralab.core.prefix import prefix_modules
from loralab.engine.config import load_config
from loralab.engine.runner import run_training
from loralab.models.tiny import tiny_model, tiny_tokenizer
from loralab.tasks.e2e import experiment as E2E
from loralab.tasks.e2e import generate as e2e_generate
from tests.tasks.common.tiny_runs import E2E_CSV, LLAMA, adapter, expected_kinds

EXP = E2E.EXPERIMENT
GPT2 = {"H": 32, "L": 2, "d_kv": 32}


@pytest.fixture
def arch():
    return {"arch": "llama"}


@pytest.fixture
def zoo(monkeypatch, arch):
    """The zoo gives a fresh tiny model (seed 0) of ``arch["arch"]`` and its tokenizer for any name."""
    monkeypatch.setattr("loralab.models.zoo.load_from_config",
                        lambda model_cfg, kind="causal_lm", num_labels=None: (tiny_model(arch["arch"], "causal_lm"),
                                                                              tiny_tokenizer(arch["arch"])))


@pytest.fixture
def scored(monkeypatch):
    calls = []

    def fake_score(hyps, refs):
        calls.append(hyps)
        return {"BLEU": 0.1 * len(calls), "NIST": 1.0, "METEOR": 0.1, "ROUGE_L": 0.1, "CIDEr": 0.1}

    monkeypatch.setattr("loralab.metrics.e2e.score", fake_score)
    return calls


def _cfg(tmp_path, *overrides):
    data = tmp_path / "e2e.csv"
    data.write_text(E2E_CSV, encoding="utf-8")
    return load_config(preset="e2e-cpu", overrides=[
        f"data.train_file={data}", f"data.eval_file={data}", "data.train_samples=0", "data.eval_samples=0",
        "train.max_steps=2", "train.warmup_steps=0", "train.batch_size=2", "train.lr=1e-2", "train.quiet=true",
        "generate.num_beams=1", "generate.no_repeat_ngram_size=0", "generate.max_new_tokens=4",
        f"out_dir={tmp_path / 'runs'}", *overrides])


def _logits(model, tok):
    ids = torch.tensor([tok("name[A] | A is")["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


CASES = {  # (overrides, expected_kinds kwargs on the tiny Llama)
    "adapter_h": (["lora.method=adapter_h", "lora.r=4"], {"r": 4}),
    "adapter_l": (["lora.method=adapter_l", "lora.r=4"], {"r": 4}),
    "adapter_p": (["lora.method=adapter_p", "lora.r=4"], {"r": 4}),
    "prefix_layer": (["lora.method=prefix_layer", "lora.prefix_length=3"], {"l_p": 3}),
    "prefix_layer_reparam": (["lora.method=prefix_layer", "lora.prefix_length=3", "lora.prefix_reparam=true",
                              "lora.prefix_reparam_dim=4", "lora.prefix_reparam_hidden=6"], {"l_p": 3, "e": 4, "h": 6}),
    "ft_top2": (["lora.method=ft_top2", "lora.top_layers=1"], {"k": 1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_e2e_method_trains_counts_saves_and_reloads(tmp_path, zoo, scored, monkeypatch, case):
    overrides, formula = CASES[case]
    method = overrides[0].split("=")[1]
    builds = []
    original = EXP.build
    monkeypatch.setattr(EXP, "build", lambda cfg: builds.append(original(cfg)) or builds[-1])
    run, results = run_training(_cfg(tmp_path, *overrides))
    dims = {"H": LLAMA["H"], "L": LLAMA["L"], "d_kv": LLAMA["d_kv"], "layer": LLAMA["layer"], "layer_bias": 0}
    kinds = expected_kinds(method, **dims, **formula)
    if method == "adapter_l":  # Lin's LayerNorm is a real LayerNorm (weight + bias) even on an RMSNorm model
        assert kinds == {"adapter": 2 * adapter(32, 4) + 2 * 2 * 32}
    by_kind = results["details"]["method_info"]["by_kind"]
    assert {k: v["trainable"] for k, v in by_kind.items() if v["trainable"]} == kinds  # no head: the LM head is tied
    assert results["params"]["trainable"] == sum(kinds.values())
    saved = json.loads((run.dir / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == method and saved["head"] == []

    tok = tiny_tokenizer("llama")
    expected = _logits(builds[0].model, tok)
    reloaded = EXP.build(_cfg(tmp_path, *overrides, f"lora.init_from={run.dir / 'adapter'}"))
    torch.testing.assert_close(_logits(reloaded.model, tok), expected, rtol=0, atol=1e-6)
    assert (_logits(tiny_model("llama", "causal_lm"), tok) - expected).abs().max() > 1e-4  # it trained


def test_prefix_layer_baseline_decodes_the_base_model(tmp_path, zoo, scored):
    cfg = _cfg(tmp_path, "lora.method=prefix_layer", "lora.prefix_length=4", "generate.max_new_tokens=8")
    built = EXP.build(cfg)
    tok, mrs = built.state["tokenizer"], built.state["mrs"]
    base = e2e_generate.generate_outputs(tiny_model("llama", "causal_lm"), tok, mrs, cfg.generate)
    with torch.no_grad():  # prefixes large enough to change the greedy decode
        for name, p in built.model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 3.0)
    assert e2e_generate.generate_outputs(built.model, tok, mrs, cfg.generate) != base
    EXP.baseline(built)
    assert scored[-1] == base


def test_prefix_init_text_starts_the_prefixes_at_the_models_own_activations(tmp_path, zoo):
    """lora.prefix_init_text: the text's tokens, cycled to l_p, through the frozen model; each layer's prefixes
    are its KV cache for them. With the reparametrisation or a warm start it is refused, naming the fix."""
    from loralab.engine.typed_config import ConfigError

    cfg = _cfg(tmp_path, "lora.method=prefix_layer", "lora.prefix_length=5", "lora.prefix_init_text=ab c")
    built = EXP.build(cfg)
    tokens = built.state["method"]["prefix_init"]["tokens"]
    ids = tiny_tokenizer("llama")("ab c", add_special_tokens=False)["input_ids"]
    assert len(ids) < 5 and tokens == [ids[i % len(ids)] for i in range(5)]
    cache = tiny_model("llama", "causal_lm")(input_ids=torch.tensor([tokens]), use_cache=True).past_key_values
    for (_, kv), layer in zip(prefix_modules(built.model), cache.layers, strict=True):
        torch.testing.assert_close(kv.key, layer.keys[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kv.value, layer.values[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="read only with lora.prefix_reparam=false"):
        _cfg(tmp_path, "lora.method=prefix_layer", "lora.prefix_reparam=true", "lora.prefix_init_text=ab")
    with pytest.raises(ConfigError, match="beside lora.init_from"):
        _cfg(tmp_path, "lora.method=prefix_layer", "lora.prefix_init_text=ab", f"lora.init_from={tmp_path}")


def test_e2e_refuses_prefix_embed_with_the_reason(tmp_path, zoo):
    with pytest.raises(ValueError, match="prefix_embed: not available for E2E: .*no incremental decoding"):
        EXP.build(_cfg(tmp_path, "lora.method=prefix_embed"))


@pytest.mark.parametrize("arch", [{"arch": "gpt2"}])
def test_gpt2_the_papers_model_takes_adapters_and_prefixes(tmp_path, zoo, scored, arch):
    """GPT-2 (Conv1D projections, fused c_attn): Adapter^H and PreLayer counts through the runner."""
    for overrides, kinds in ((["lora.method=adapter_h", "lora.r=4"], {"adapter": 2 * 2 * adapter(32, 4)}),
                             (["lora.method=prefix_layer", "lora.prefix_length=5"], {"prefix": 2 * 2 * 32 * 5})):
        _, results = run_training(_cfg(tmp_path, *overrides))
        by_kind = results["details"]["method_info"]["by_kind"]
        assert {k: v["trainable"] for k, v in by_kind.items() if v["trainable"]} == kinds
        assert kinds == expected_kinds(overrides[0].split("=")[1], **GPT2, r=4, l_p=5)
