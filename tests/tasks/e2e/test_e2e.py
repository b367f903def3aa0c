"""E2E experiment: data encoding and masking, the label-smoothed completion loss, decoding, grouping,
the un-adapted-model baseline, and build -> baseline -> fit -> report wiring."""

from __future__ import annotations

import math
import types

import pytest
import torch

from loralab.engine.config import load_config
from loralab.engine.experiment import get_experiment
from loralab.models.tiny import tiny_model, tiny_tokenizer
from loralab.tasks.common.batches import IGNORE, make_collate
from loralab.tasks.common.causal_lm import mean_token_loss
from loralab.tasks.common.setup import apply_method
from loralab.tasks.e2e import data as e2e_data
from loralab.tasks.e2e import experiment as e2e
from loralab.tasks.e2e import generate as e2e_generate
from loralab.tasks.e2e.data import SEPARATOR

EXP = e2e.EXPERIMENT


def _chars(tok, text):
    """Independent tokenization: the tiny tokenizer maps each character to one id."""
    return tok.convert_tokens_to_ids(list(text))


# ---------------------------------------------------------------- encoding and masking


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_labels_mask_prompt_and_padding_keep_reference_and_eos(arch):
    tok = tiny_tokenizer(arch)
    mr, ref = "name[Zizzi], eatType[pub]", "Zizzi is a pub."
    ex = e2e_data.encode_example(tok, mr, ref, max_length=128)
    prompt = _chars(tok, mr + SEPARATOR)
    completion = _chars(tok, " " + ref) + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + completion
    assert ex["labels"] == [IGNORE] * len(prompt) + completion
    short = e2e_data.encode_example(tok, "name[A]", "A.", max_length=128)
    batch = make_collate(tok.pad_token_id)([ex, short])
    n = len(short["input_ids"])
    pad = len(ex["input_ids"]) - n
    assert batch["input_ids"][1].tolist() == short["input_ids"] + [tok.pad_token_id] * pad
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * pad
    # llama's pad id equals its EOS id: the real EOS is still a label, the padding is not
    assert batch["labels"][1].tolist() == short["labels"] + [IGNORE] * pad
    assert batch["labels"][1, n - 1].item() == tok.eos_token_id
    assert batch["labels"][0].tolist() == ex["labels"]


def test_truncation_cuts_the_completion_and_long_prompts_fail():
    tok = tiny_tokenizer("gpt2")
    prompt_len = len("name[A]" + SEPARATOR)
    ex = e2e_data.encode_example(tok, "name[A]", "A long reference.", max_length=prompt_len + 3)
    assert len(ex["input_ids"]) == prompt_len + 3
    assert ex["labels"] == [IGNORE] * prompt_len + _chars(tok, " A ")
    with pytest.raises(e2e_data.E2EDataError, match="data.max_length"):
        e2e_data.encode_example(tok, "name[A]", "x", max_length=prompt_len)


# ---------------------------------------------------------------- loss


def test_label_smoothed_completion_loss_matches_explicit_formula():
    tok = tiny_tokenizer("gpt2")
    model = tiny_model("gpt2", "causal_lm", seed=1)
    rows = [("name[A], food[Thai]", "A serves Thai food."), ("name[B]", "B.")]
    batch = make_collate(tok.pad_token_id)(e2e_data.encode_rows(tok, rows, 128))
    eps = 0.1
    got = mean_token_loss(model, batch, label_smoothing=eps).detach()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    terms = []
    for b in range(logits.size(0)):
        for t in range(logits.size(1) - 1):
            y = int(batch["labels"][b, t + 1])
            if y == IGNORE:
                continue
            logp = torch.log_softmax(logits[b, t], dim=-1)
            terms.append((1 - eps) * -logp[y] + eps * -logp.mean())
    n_completion = sum(len(" " + ref) + 1 for _, ref in rows) - 0  # reference chars + EOS, per row
    assert len(terms) == n_completion
    assert got.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)


def test_loss_ignores_padding_and_reads_task_label_smoothing():
    tok = tiny_tokenizer("llama")
    model = tiny_model("llama", "causal_lm", seed=2)
    rows = [("name[A], area[city centre]", "A is central."), ("name[B]", "B.")]
    spec = e2e.make_task_spec(tok, rows, rows, max_length=128)
    spec.label_smoothing = 0.0
    collate = spec.collate
    both = spec.loss(model, collate(spec.train_dataset)).item()
    singles = [spec.loss(model, collate([ex])).item() for ex in spec.train_dataset]
    counts = [sum(1 for y in ex["labels"][1:] if y != IGNORE) for ex in spec.train_dataset]
    assert both == pytest.approx(sum(s * c for s, c in zip(singles, counts)) / sum(counts), rel=1e-5)
    spec.label_smoothing = 0.1
    smoothed = spec.loss(model, collate(spec.train_dataset)).item()
    assert smoothed == pytest.approx(mean_token_loss(model, collate(spec.train_dataset), 0.1).item())
    assert smoothed != pytest.approx(both)
    assert spec.metric is None and spec.evaluate(model)["eval_loss"] == pytest.approx(both, rel=1e-5)


# ---------------------------------------------------------------- decoding


def _gen(**kw):
    base = dict(num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4, max_new_tokens=64, batch_size=8,
                do_sample=False, temperature=1.0, backend="loralab", dtype="float32")
    return types.SimpleNamespace(**{**base, **kw})


def test_decoding_settings_left_padding_and_order(monkeypatch):
    tok = tiny_tokenizer("gpt2")
    model = tiny_model("gpt2", "causal_lm")
    calls = []
    eos = tok.eos_token_id

    def fake_generate(input_ids, attention_mask, generation_config, stopping_criteria=None):
        calls.append((input_ids.clone(), attention_mask.clone(), generation_config))
        new = torch.tensor([_chars(tok, f" out{i}") + [eos] + _chars(tok, "junk") for i in range(len(input_ids))])
        return torch.cat([input_ids, new[:, : new.size(1)]], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    mrs = ["name[Long MR here]", "name[B]", "name[Mid MR]"]
    outputs = e2e_generate.generate_outputs(model, tok, mrs, _gen(batch_size=2, backend="transformers"))
    config = calls[0][2]
    assert (config.num_beams, config.length_penalty, config.no_repeat_ngram_size, config.max_new_tokens) == (10, 0.9, 4, 64)
    assert config.eos_token_id == eos and config.pad_token_id == tok.pad_token_id and config.do_sample is False
    assert (config.repetition_penalty, config.num_return_sequences, config.use_cache) == (1.0, 1, True)
    ids, mask = calls[0][0], calls[0][1]  # shortest prompts first: "name[B]" and "name[Mid MR]"
    short = _chars(tok, "name[B]" + SEPARATOR)
    width = ids.size(1)
    assert ids[0].tolist() == [tok.pad_token_id] * (width - len(short)) + short
    assert mask[0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    # outputs back in MR order, cut at EOS; batch rows were (B, Mid) then (Long)
    assert outputs == ["out0", "out0", "out1"]


def test_batched_greedy_equals_manual_greedy_per_prompt():
    tok = tiny_tokenizer("gpt2")
    model = tiny_model("gpt2", "causal_lm", seed=3)
    mrs = ["name[The Eagle], food[French], area[riverside]", "name[Z]", "name[Cotto], priceRange[cheap]"]
    got = e2e_generate.generate_outputs(model, tok, mrs, _gen(num_beams=1, no_repeat_ngram_size=0,
                                                              max_new_tokens=6, batch_size=3))
    expected = []
    with torch.no_grad():
        for mr in mrs:
            ids = _chars(tok, mr + SEPARATOR)
            new = []
            for _ in range(6):  # full forward each step, no padding, no cache
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
            expected.append(e2e_generate.clean_output(tok.decode(new)))
    assert got == expected


def test_batched_beam_search_equals_beam_search_per_prompt():
    """Left padding and length-sorted batching must not change what beam search finds."""
    tok = tiny_tokenizer("gpt2")
    model = tiny_model("gpt2", "causal_lm", seed=4)
    mrs = ["name[Alimentum], area[city centre], familyFriendly[no]", "name[X]", "name[Aromi], eatType[pub]"]
    settings = dict(num_beams=3, no_repeat_ngram_size=2, max_new_tokens=6, length_penalty=0.9)
    batched = e2e_generate.generate_outputs(model, tok, mrs, _gen(batch_size=3, **settings))
    alone = [e2e_generate.generate_outputs(model, tok, [mr], _gen(batch_size=1, **settings))[0] for mr in mrs]
    assert batched == alone
    greedy = e2e_generate.generate_outputs(model, tok, mrs, _gen(batch_size=3, num_beams=1, max_new_tokens=6,
                                                                 no_repeat_ngram_size=2))
    assert greedy != batched  # the beam setting reaches generate (a random tiny model disagrees with greedy)


# ---------------------------------------------------------------- data files and grouping


def test_reference_grouping_first_seen_order_all_references():
    rows = [("m2", "b1"), ("m1", "a1"), ("m2", "b2"), ("m3", "c1"), ("m1", "a2"), ("m2", "b3")]
    mrs, refs = e2e_data.eval_groups(rows)
    assert mrs == ["m2", "m1", "m3"]
    assert refs == [["b1", "b2", "b3"], ["a1", "a2"], ["c1"]]
    assert e2e_data.eval_groups(rows, max_mrs=2) == (["m2", "m1"], [["b1", "b2", "b3"], ["a1", "a2"]])


def test_csv_edge_cases(tmp_path):
    path = tmp_path / "e2e.csv"
    path.write_bytes(
        "\ufeffmr,ref,extra\r\n"
        '"name[Café Rouge], food[Italian]","It\'s ""cheap"", near Café\r\nSicilia.",x\r\n'
        "\r\n"
        "name[B],B is good.,y\r\n".encode("utf-8"))
    rows = e2e_data.load_rows(path)
    assert rows == [("name[Café Rouge], food[Italian]", 'It\'s "cheap", near Café\r\nSicilia.'), ("name[B]", "B is good.")]
    bad = tmp_path / "bad.csv"
    bad.write_text("mr,ref\nname[A],\n", encoding="utf-8")
    with pytest.raises(e2e_data.E2EDataError, match="empty 'ref'"):
        e2e_data.load_rows(bad)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("input,output\na,b\n", encoding="utf-8")
    with pytest.raises(e2e_data.E2EDataError, match="'mr' and 'ref'"):
        e2e_data.load_rows(wrong)
    # (the seeded subsample of data.train_samples: tests/tasks/common/test_sampling.py)


def test_shared_data_grouping_counts():
    cfg = load_config(preset="e2e-cpu", overrides=["data.train_samples=0", "data.eval_samples=0"])
    try:
        train, mrs, refs, eval_rows = e2e.load_data(cfg)
    except e2e_data.E2EDataError:
        pytest.skip("../shared/data/e2e is not here")
    assert (len(train), len(mrs), sum(map(len, refs)), len(eval_rows)) == (4672, 630, 4693, 4693)


def test_reference_file_is_official_format(tmp_path):
    refs = [["A is a pub.", "A: a pub\nin town."], ["B."]]
    e2e_generate.write_references(tmp_path / "refs.txt", refs)
    assert (tmp_path / "refs.txt").read_text() == "A is a pub.\nA: a pub in town.\n\nB.\n"
    from loralab.metrics.e2e import read_references

    assert read_references(str(tmp_path / "refs.txt"), n_outputs=2) == [["A is a pub.", "A: a pub in town."], ["B."]]


# ---------------------------------------------------------------- models, presets, build / report


def test_lora_targets_per_architecture():
    from loralab.core.inject import lora_modules

    section = load_config(overrides=["experiment=e2e"]).lora  # default targets ["query", "value"]
    gpt2 = tiny_model("gpt2", "causal_lm")
    info = apply_method(gpt2, section, "CAUSAL_LM")
    assert info["target_modules"] is None and info["fused_qkv"] == {"c_attn": [True, False, True]}
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(gpt2)}) == ["c_attn"]
    # q and v slices of 2 layers: A (r x 32) and B (32 x r) per slice, nothing else trains
    trainable = sum(p.numel() for p in gpt2.parameters() if p.requires_grad)
    assert trainable == info["trainable"] == 2 * 2 * (section.r * 32 + 32 * section.r)
    llama = tiny_model("llama", "causal_lm")
    info = apply_method(llama, section, "CAUSAL_LM", base_model_name="tiny-llama")
    assert info["target_modules"] == ["q_proj", "v_proj"]
    assert llama.lora_configs["default"].task_type == "CAUSAL_LM"
    assert llama.lora_configs["default"].base_model_name_or_path == "tiny-llama"
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(llama)})
    assert names == ["q_proj", "v_proj"]


def test_presets():
    paper = load_config(preset="e2e-paper")
    assert (paper.lora.r, paper.lora.lora_alpha, paper.lora.lora_dropout) == (4, 32.0, 0.1)
    assert paper.lora.fused_qkv == {"c_attn": [True, False, True]} and paper.model.name == "gpt2-medium"
    t = paper.train
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs, t.warmup_steps, t.schedule,
            t.label_smoothing) == ("adamw", 2e-4, 0.01, 8, 5.0, 500, "linear", 0.1)
    g = paper.generate
    assert (g.num_beams, g.length_penalty, g.no_repeat_ngram_size, g.max_new_tokens) == (10, 0.9, 4, 64)
    cpu = load_config(preset="e2e-cpu")
    assert cpu.model.name == "smollm2-135m" and cpu.data.train_samples > 0 and cpu.experiment == "e2e"
    assert isinstance(cpu.data, e2e.E2EData) and EXP.sections == ("generate",) and get_experiment("e2e") is EXP
    methods = ("adapter_h", "adapter_l", "prefix_layer", "ft_top2", "full")
    assert set(EXP.presets) == {"e2e-paper", "e2e-paper-smollm2", "e2e-cpu"} | {f"e2e-cpu-{m}" for m in methods}
    for m in methods:  # the e2e-cpu budget with the method's own settings
        c = load_config(preset=f"e2e-cpu-{m}")
        assert c.lora.method == m and (c.data.train_samples, c.data.eval_samples) == (200, 20)
        assert c.train.epochs == cpu.train.epochs and c.generate.num_beams == cpu.generate.num_beams
    assert load_config(preset="e2e-cpu-full").train.lr < load_config(preset="e2e-cpu-adapter_h").train.lr


def _cpu_cfg(data, *overrides):
    return load_config(preset="e2e-cpu", overrides=[
        f"data.train_file={data}", f"data.eval_file={data}", "data.train_samples=0", "data.eval_samples=0",
        "train.max_steps=2", "train.warmup_steps=1", "train.batch_size=2", "train.quiet=true", *overrides])


@pytest.fixture
def tiny_zoo(monkeypatch):
    """The zoo gives a fresh tiny Llama (seed 0) and its character tokenizer for any model name."""
    monkeypatch.setattr("loralab.models.zoo.load_from_config",
                        lambda model_cfg, kind="causal_lm", num_labels=None: (tiny_model("llama", "causal_lm"),
                                                                              tiny_tokenizer("llama")))


@pytest.fixture
def fake_scores(monkeypatch):
    """The official scorer stand-in: records what it scores; BLEU 0.3 on the first call, 0.5 after."""
    scored = []

    def fake_score(hyps, refs):
        scored.append((hyps, refs))
        bleu = 0.3 if len(scored) == 1 else 0.5
        return {"BLEU": bleu, "NIST": 4.0, "METEOR": 0.4, "ROUGE_L": 0.6, "CIDEr": 2.0}

    monkeypatch.setattr("loralab.metrics.e2e.score", fake_score)
    return scored


E2E_CSV = "mr,ref\nname[A],A is nice.\nname[B],B is a pub.\nname[A],A is good.\n"


def test_baseline_is_the_model_with_adapters_disabled(tmp_path, tiny_zoo, fake_scores):
    """Fresh LoRA: the baseline decodes exactly what the untouched base model decodes. With a non-zero
    adapter the baseline still decodes the base model (adapters off), and the adapter is back on after."""
    from loralab.core.inject import lora_modules

    data = tmp_path / "e2e.csv"
    data.write_text(E2E_CSV, encoding="utf-8")
    cfg = _cpu_cfg(data, "generate.num_beams=1", "generate.no_repeat_ngram_size=0", "generate.max_new_tokens=6")
    built = EXP.build(cfg)
    tok, mrs = built.state["tokenizer"], built.state["mrs"]
    base_outputs = e2e_generate.generate_outputs(tiny_model("llama", "causal_lm"), tok, mrs, cfg.generate)
    first = EXP.baseline(built)
    assert fake_scores[0] == (base_outputs, [["A is nice.", "A is good."], ["B is a pub."]])
    assert first.kind == "un-adapted model" and first.score == 0.3 and first.metrics["NIST"] == 4.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_modules(built.model):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g))
    adapted = e2e_generate.generate_outputs(built.model, tok, mrs, cfg.generate)
    assert adapted != base_outputs  # the adapter changes what is decoded
    EXP.baseline(built)
    assert fake_scores[1][0] == base_outputs  # adapters off inside baseline()
    assert e2e_generate.generate_outputs(built.model, tok, mrs, cfg.generate) == adapted  # and on again


def test_build_fit_report_end_to_end(tmp_path, tiny_zoo, fake_scores):
    from loralab.engine.trainer import fit

    data = tmp_path / "e2e.csv"
    data.write_text(E2E_CSV, encoding="utf-8")
    cfg = _cpu_cfg(data, "generate.num_beams=2", "generate.max_new_tokens=4")
    built = EXP.build(cfg)
    model, spec = built.model, built.task
    assert len(spec.train_dataset) == 3 and built.state["method"]["trainable"] > 0
    built.baseline = EXP.baseline(built)
    result = EXP.report(built, fit(model, spec, cfg.train, run_dir=tmp_path / "run"), tmp_path / "run")
    hyps, refs = fake_scores[1]
    assert refs == [["A is nice.", "A is good."], ["B is a pub."]]
    assert (tmp_path / "run" / "hyp.txt").read_text().split("\n")[:-1] == hyps
    assert (tmp_path / "run" / "refs.txt").read_text() == "A is nice.\nA is good.\n\nB is a pub.\n"
    assert (tmp_path / "run" / "mrs.txt").read_text() == "name[A]\nname[B]\n"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    table = result.details["table"]
    assert "| 70.4 | 8.85 | 46.8 | 71.8 | 2.53 |" in table  # the paper's row
    assert "| baseline: the un-adapted model | 30.0 | 4.00 | 40.0 | 60.0 | 2.00 |" in table
    assert "| 50.0 | 4.00 | 40.0 | 60.0 | 2.00 |" in table.splitlines()[-1]  # this run
    assert (result.experiment, result.main_metric, result.greater_is_better) == ("e2e", "BLEU", True)
    assert math.isclose(result.score, 0.5) and result.baseline.score == 0.3
    assert result.margin == e2e.BLEU_MARGIN and result.learned is True  # 0.5 - 0.3 > one BLEU point
    record = result.to_dict()
    assert record["baseline"] == {"score": 0.3, "kind": "un-adapted model",
                                  "metrics": {"BLEU": 0.3, "NIST": 4.0, "METEOR": 0.4, "ROUGE_L": 0.6, "CIDEr": 2.0}}
    assert record["details"]["hyp_file"] == str(tmp_path / "run" / "hyp.txt") and record["details"]["eval_mrs"] == 2
    assert record["params"]["trainable"] == built.state["method"]["trainable"]


def test_methods_full_and_bitfit():
    cfg = load_config(overrides=["experiment=e2e", "lora.method=full"])
    model = tiny_model("gpt2", "causal_lm")
    info = apply_method(model, cfg.lora, "CAUSAL_LM")
    assert info["trainable"] == info["total"] == sum(p.numel() for p in model.parameters())
    cfg = load_config(overrides=["experiment=e2e", "lora.method=bitfit"])
    gpt2 = tiny_model("gpt2", "causal_lm")
    info = apply_method(gpt2, cfg.lora, "CAUSAL_LM")
    assert info["trainable"] == sum(p.numel() for n, p in gpt2.named_parameters() if n.endswith("bias"))
    assert all(n.endswith("bias") for n, p in gpt2.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="has no bias parameters to train"):
        apply_method(tiny_model("llama", "causal_lm"), cfg.lora, "CAUSAL_LM")  # Llama has no biases
