"""E2E task: data encoding and masking, the label-smoothed completion loss, decoding, grouping, wiring."""

from __future__ import annotations

import math
import types

import pytest
import torch

from loralab.engine.config import load_config
from loralab.models.tiny import tiny_model, tiny_tokenizer
from loralab.tasks import e2e, e2e_data, e2e_generate
from loralab.tasks.e2e_data import IGNORE, SEPARATOR


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
    batch = e2e_data.make_collate(tok.pad_token_id)([ex, short])
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
    batch = e2e_data.make_collate(tok.pad_token_id)(e2e_data.encode_rows(tok, rows, 128))
    eps = 0.1
    got = e2e_data.completion_loss(model, batch, label_smoothing=eps).detach()
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
    assert smoothed == pytest.approx(e2e_data.completion_loss(model, collate(spec.train_dataset), 0.1).item())
    assert smoothed != pytest.approx(both)
    assert spec.metric is None and spec.evaluate(model)["eval_loss"] == pytest.approx(both, rel=1e-5)


# ---------------------------------------------------------------- decoding


def _gen(**kw):
    base = dict(num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4, max_new_tokens=64, batch_size=8,
                do_sample=False, temperature=1.0)
    return types.SimpleNamespace(**{**base, **kw})


def test_decoding_settings_left_padding_and_order(monkeypatch):
    tok = tiny_tokenizer("gpt2")
    model = tiny_model("gpt2", "causal_lm")
    calls = []
    eos = tok.eos_token_id

    def fake_generate(input_ids, attention_mask, generation_config):
        calls.append((input_ids.clone(), attention_mask.clone(), generation_config))
        new = torch.tensor([_chars(tok, f" out{i}") + [eos] + _chars(tok, "junk") for i in range(len(input_ids))])
        return torch.cat([input_ids, new[:, : new.size(1)]], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    mrs = ["name[Long MR here]", "name[B]", "name[Mid MR]"]
    outputs = e2e_generate.generate_outputs(model, tok, mrs, _gen(batch_size=2))
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
    assert e2e_data.subsample(list(range(10)), 3, seed=0) == e2e_data.subsample(list(range(10)), 3, seed=0)
    assert len(set(e2e_data.subsample(list(range(10)), 3, seed=0))) == 3


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
    cfg = e2e.lora_config_for(gpt2, section)
    assert cfg.target_modules is None and cfg.fused_qkv == {"c_attn": [True, False, True]}
    from loralab.core.inject import inject_adapter

    inject_adapter(gpt2, cfg)
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(gpt2)}) == ["c_attn"]
    # q and v slices of 2 layers: A (r x 32) and B (32 x r) per slice, nothing else trains
    trainable = sum(p.numel() for p in gpt2.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * (cfg.r * 32 + 32 * cfg.r)
    llama = tiny_model("llama", "causal_lm")
    cfg = e2e.lora_config_for(llama, section)
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.task_type == "CAUSAL_LM"
    inject_adapter(llama, cfg)
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(llama)})
    assert names == ["q_proj", "v_proj"]


def test_presets():
    paper = load_config(preset="e2e-paper")
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout) == (4, 32.0, 0.1)
    assert paper.lora.fused_qkv == {"c_attn": [True, False, True]} and paper.model.name == "gpt2-medium"
    t = paper.train
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs, t.warmup_steps, t.schedule,
            t.label_smoothing) == ("adamw", 2e-4, 0.01, 8, 5.0, 500, "linear", 0.1)
    g = paper.generate
    assert (g.num_beams, g.length_penalty, g.no_repeat_ngram_size, g.max_new_tokens) == (10, 0.9, 4, 64)
    cpu = load_config(preset="e2e-cpu")
    assert cpu.model.name == "smollm2-135m" and cpu.data.train_samples > 0 and cpu.experiment == "e2e"


def test_build_fit_report_end_to_end(tmp_path, monkeypatch):
    from loralab.engine.trainer import fit

    data = tmp_path / "e2e.csv"
    data.write_text("mr,ref\nname[A],A is nice.\nname[B],B is a pub.\nname[A],A is good.\n", encoding="utf-8")
    cfg = load_config(preset="e2e-cpu", overrides=[
        f"data.train_file={data}", f"data.eval_file={data}", "data.train_samples=0", "data.eval_samples=0",
        "train.max_steps=2", "train.warmup_steps=1", "train.batch_size=2", "train.quiet=true", "generate.num_beams=2",
        "generate.max_new_tokens=4"])
    monkeypatch.setattr(e2e, "load_model_and_tokenizer",
                        lambda cfg: (tiny_model("llama", "causal_lm"), tiny_tokenizer("llama")))
    scored = []

    def fake_score(hyps, refs):
        scored.append((hyps, refs))
        return {"BLEU": 0.5, "NIST": 4.0, "METEOR": 0.4, "ROUGE_L": 0.6, "CIDEr": 2.0}

    monkeypatch.setattr("loralab.metrics.e2e.score", fake_score)
    model, spec, tok = e2e.build(cfg)
    assert len(spec.train_dataset) == 3 and model.e2e_info["trainable"] > 0
    result = e2e.report(cfg, model, tok, tmp_path / "run", fit(model, spec, cfg.train))
    hyps, refs = scored[0]
    assert refs == [["A is nice.", "A is good."], ["B is a pub."]]
    assert (tmp_path / "run" / "hyp.txt").read_text().split("\n")[:-1] == hyps
    assert (tmp_path / "run" / "refs.txt").read_text() == "A is nice.\nA is good.\n\nB is a pub.\n"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert "| 70.4 | 8.85 | 46.8 | 71.8 | 2.53 |" in result["table"]
    assert "| 50.0 | 4.00 | 40.0 | 60.0 | 2.00 |" in result["table"]
    assert math.isclose(result["score"], 0.5)


def test_methods_full_and_bitfit():
    cfg = load_config(overrides=["experiment=e2e", "lora.method=full"])
    model = tiny_model("gpt2", "causal_lm")
    info = e2e.apply_method(model, cfg)
    assert info["trainable"] == info["total"] == sum(p.numel() for p in model.parameters())
    cfg = load_config(overrides=["experiment=e2e", "lora.method=bitfit"])
    gpt2 = tiny_model("gpt2", "causal_lm")
    info = e2e.apply_method(gpt2, cfg)
    assert info["trainable"] == sum(p.numel() for n, p in gpt2.named_parameters() if n.endswith("bias"))
    with pytest.raises(RuntimeError, match="no parameter trains"):
        e2e.apply_method(tiny_model("llama", "causal_lm"), cfg)  # Llama has no biases
