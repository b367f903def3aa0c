"""`loralab quickstart`: the preset, and the whole pipeline on a tiny 4-bit Llama (zoo monkeypatched)."""
import json
import re

import pytest
import torch

from loralab.core.linear4bit import Linear4bit, quantize_model
from loralab.models.tiny import tiny_model, tiny_tokenizer


def test_quickstart_preset_is_qlora_on_gsm8k():
    from loralab.engine.config import load_config
    from loralab.tasks.instruct.presets import QUICKSTART_SYSTEM_PROMPT

    cfg = load_config(preset="quickstart")
    assert (cfg.experiment, cfg.model.name, cfg.data.task) == ("instruct", "smollm2-135m", "gsm8k")
    assert (cfg.model.quantize, cfg.model.double_quant, cfg.model.compute_dtype) == ("nf4", True, "auto")
    assert (cfg.lora.method, cfg.lora.target_modules, cfg.lora.exclude_modules) == ("lora", "all-linear", ["lm_head"])
    assert cfg.data.loss_on == "assistant" and cfg.data.system_prompt == QUICKSTART_SYSTEM_PROMPT
    assert cfg.generate.num_beams == 1 and not cfg.generate.do_sample  # greedy exact match
    assert cfg.data.max_length >= 288 and 8 <= cfg.data.eval_samples <= 32


def _tiny_4bit(seed: int = 0, compute_dtype=torch.float32):
    model = tiny_model("llama", "causal_lm", seed=seed, max_position_embeddings=2048, tie_word_embeddings=False)
    return quantize_model(model, "nf4", double_quant=True, skip_modules=("lm_head",), block_size=32,
                          compute_dtype=compute_dtype)


@pytest.fixture
def tiny_zoo(monkeypatch):
    """The zoo returns a tiny NF4 + double-quant Llama (and its char tokenizer) for any name."""
    from loralab.models import zoo

    calls = []

    def load_model(name, kind="causal_lm", quantize=None, double_quant=True, **kw):
        calls.append({"name": name, "kind": kind, "quantize": quantize, "double_quant": double_quant})
        assert quantize == "nf4" and double_quant
        return _tiny_4bit(compute_dtype=kw.get("compute_dtype", torch.float32))

    monkeypatch.setattr(zoo, "load_model", load_model)
    monkeypatch.setattr(zoo, "load_tokenizer", lambda name, **kw: tiny_tokenizer("llama", model_max_length=2048))
    monkeypatch.delenv("LORALAB_JUDGE_URL", raising=False)
    return calls


def test_quickstart_end_to_end_on_tiny_4bit_llama(tmp_path, tiny_zoo, capsys):
    from loralab import cli
    from loralab.core.adapter_io import load_adapter
    from loralab.core.inject import lora_modules

    code = cli.main(["quickstart", f"out_dir={tmp_path}", "data.train_samples=8", "data.eval_samples=2",
                     "data.max_length=1024", "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2",
                     "generate.max_new_tokens=6", "generate.batch_size=2", "train.quiet=true"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert tiny_zoo and tiny_zoo[0]["name"] == "smollm2-135m"
    run_dir = next(p.parent for p in tmp_path.rglob("instruct_result.json"))
    result = json.loads((run_dir / "instruct_result.json").read_text())
    h = result["heldout"]
    # the printed numbers are the ones computed (independently: exp(loss) is the perplexity)
    assert f"held-out loss  {h['base_loss']:.4f} -> {h['finetuned_loss']:.4f}" in out
    assert h["base_ppl"] == pytest.approx(torch.tensor(h["base_loss"], dtype=torch.float64).exp().item(), rel=1e-6)
    assert h["finetuned_loss"] != h["base_loss"]
    g = result["gsm8k"]
    base_right = sum(r["correct"] for r in g["base"]["records"])
    tuned_right = sum(r["correct"] for r in g["finetuned"]["records"])
    assert f"GSM8K exact    {base_right}/2 -> {tuned_right}/2" in out
    assert "adapter check  passed" in out and out.index("adapter check") < out.index("held-out loss")
    assert re.search(r"frozen base\s+4-bit packed", out) and "quant state" in out  # the 4-bit base shows
    assert re.search(r"peak RSS [\d,]+ MB", out)
    for key, label in (("answer_format", "answer format"), ("loops", "looping")):
        shares = [f"{sum(r[key] for r in g[side]['records'])}/2" for side in ("base", "finetuned")]
        assert f"{label:14s} {shares[0]} -> {shares[1]}" in out
    # model.compute_dtype=auto: bf16 exactly where the CPU has AVX512-BF16 or AMX, recorded with the reason
    compute = json.loads((run_dir / "env.json").read_text())["compute"]
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert compute["setting"] == "auto" and compute["dtype"] == ("bfloat16" if fast else "float32")
    assert compute["reason"].startswith("auto: CPU has") and compute["frozen_cast"] > 0
    adapter_dir = run_dir / "adapter"
    assert f"adapter saved  {adapter_dir}" in out and (run_dir / "summary.txt").read_text().strip() in out
    from loralab.engine.config import load_config

    lora = load_config(preset="quickstart").lora
    assert f"adapter        lora r={lora.r} alpha={lora.lora_alpha:g} on {lora.target_modules}" in out
    # results.json: the common schema, the baseline being the base model's held-out loss (lower is better)
    record = json.loads((run_dir / "results.json").read_text())
    assert (record["experiment"], record["main_metric"], record["greater_is_better"]) == ("instruct", "eval_loss",
                                                                                           False)
    assert record["baseline"]["score"] == h["base_loss"] and record["baseline"]["kind"] == "un-adapted model"
    assert record["score"] == h["finetuned_loss"] and record["margin"] == pytest.approx(0.01 * h["base_loss"])
    assert record["learned"] is (h["base_loss"] - h["finetuned_loss"] > record["margin"])
    assert record["details"]["heldout"] == h and record["run"]["task"] == "gsm8k"

    # the saved adapter loads back onto a fresh 4-bit base: trainable, non-zero, same outputs as trained
    fresh = _tiny_4bit()
    load_adapter(fresh, adapter_dir, adapter_name="default", trainable=True)
    layers = list(lora_modules(fresh))
    assert layers and all(isinstance(layer.base_layer, Linear4bit) for _, layer in layers)
    b_params = [p for _, layer in layers for p in layer.lora_B["default"].parameters()]
    assert all(p.requires_grad for p in b_params) and all(p.abs().sum() > 0 for p in b_params)
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    with torch.no_grad():
        from loralab.core.inject import disable_adapters

        on = fresh(input_ids=ids).logits
        with disable_adapters(fresh):
            off = fresh(input_ids=ids).logits
    assert (on - off).abs().max() > 0


def test_gradient_checkpointing_through_4bit_lora_gives_the_same_gradients():
    """Non-reentrant checkpointing replays the 4-bit dequantizing matmuls: LoRA grads match (fp32)."""
    from loralab.core.config import LoraConfig
    from loralab.core.inject import inject_adapter

    grads = []
    for checkpointing in (False, True):
        model = _tiny_4bit(seed=3)
        torch.manual_seed(0)
        inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["lm_head"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)  # B=0 would make A's gradient vacuous
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_resource_bench_quick_json(tmp_path, monkeypatch):
    """bench/instruct_resources.py --quick: every variant's keys, and the full-FT estimate's arithmetic.
    (Variants run in-process here; the script itself runs each in a fresh subprocess.)"""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "instruct_resources.py"
    spec = importlib.util.spec_from_file_location("instruct_resources", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "_run_variant", lambda name, overrides, steps: bench.worker(overrides, steps))
    out = tmp_path / "quick.json"
    assert bench.main(["--quick", "--out", str(out), "--run-dir", str(tmp_path / "run")]) == 0
    table = json.loads(out.read_text())
    assert set(table["variants"]) == {"qlora_gc", "qlora", "lora_fp32", "full_ft_estimate"}
    for name in ("qlora_gc", "qlora", "lora_fp32"):
        v = table["variants"][name]
        assert {"peak_rss_mb", "rss_after_build_mb", "train_peak_extra_mb", "step_seconds", "losses",
                "trainable_params", "packed_4bit_bytes"} <= set(v)
        assert len(v["losses"]) == 2 and v["peak_rss_mb"] > 0
        assert (v["packed_4bit_bytes"] > 0) == name.startswith("qlora")  # the QLoRA rows really are 4-bit
    lora, est = table["variants"]["lora_fp32"], table["variants"]["full_ft_estimate"]
    n = lora["base_params_unquantized"]
    assert est["peak_rss_mb"] == pytest.approx(lora["rss_after_build_mb"] + n * 12 / 2**20 + lora["train_peak_extra_mb"])
    assert (tmp_path / "run" / "resources.md").read_text().startswith("| variant |")
