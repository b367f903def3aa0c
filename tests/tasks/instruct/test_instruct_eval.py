"""Instruction-tuning evaluation: the adapter-present guard, the un-adapted baseline's held-out loss,
generation, GSM8K scoring, and build -> baseline -> fit -> report end to end."""
import copy
import math
import types

import pytest
import torch

from loralab.core.config import LoraConfig
from loralab.core.inject import disable_adapters, inject_adapter, lora_modules
from loralab.engine.experiment import Built, get_experiment
from loralab.tasks.common.batches import make_collate
from loralab.tasks.instruct import data as I
from loralab.tasks.instruct import eval as E
from loralab.tasks.instruct.experiment import EXPERIMENT as EXP
from loralab.tasks.instruct.experiment import make_task

from .test_instruct import CONV, _tiny_llama, tiny_tokenizer

CONVS = [CONV, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}],
         [{"role": "user", "content": "What is 9+3?"}, {"role": "assistant", "content": "12"}]]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    exs = I.tokenize_all(tok, CONVS)
    base = _tiny_llama(len(tok), seed=1)
    model = inject_adapter(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    collate = make_collate(tok.pad_token_id)
    return tok, exs, base, model, collate


def trained(model, exs, collate, steps=3):
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    task = make_task(exs, 0)
    batch = collate(exs)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    return model.eval()


def random_adapter(model, seed=0, scale=0.02):
    """Non-zero random lora_B: a 'trained' adapter whose greedy outputs are long random token strings."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)
    return model.eval()


# ----------------------------------------------------------------------------- guard

def test_guard_refuses_untrained_adapter(setup):
    tok, exs, base, model, collate = setup
    with pytest.raises(E.AdapterNotPresentError, match="all-zero lora_B"):
        E.assert_adapter_present(model, collate(exs))


def test_guard_refuses_model_without_adapter_and_disabled_adapter(setup):
    tok, exs, base, model, collate = setup
    with pytest.raises(E.AdapterNotPresentError, match="no LoRA layers"):
        E.assert_adapter_present(base, collate(exs))
    tuned = trained(model, exs, collate)
    with disable_adapters(tuned):
        with pytest.raises(E.AdapterNotPresentError, match="disabled"):
            E.assert_adapter_present(tuned, collate(exs))


def test_guard_refuses_adapter_that_does_not_change_logits(setup):
    tok, exs, base, model, collate = setup
    m = copy.deepcopy(model)
    for _, layer in lora_modules(m):  # B non-zero but A zero: B A = 0, logits identical to the base
        torch.nn.init.ones_(layer.lora_B["default"].weight)
        torch.nn.init.zeros_(layer.lora_A["default"].weight)
    with pytest.raises(E.AdapterNotPresentError, match="does not change the logits"):
        E.assert_adapter_present(m, collate(exs))


def test_guard_passes_trained_adapter(setup):
    tok, exs, base, model, collate = setup
    tuned = trained(model, exs, collate)
    tuned.train()
    info = E.assert_adapter_present(tuned, collate(exs))
    assert tuned.training  # mode restored
    n_linear = sum(1 for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert info["lora_layers"] == n_linear and info["max_logit_change"] > 0


# ----------------------------------------------------------------------------- held-out loss and the baseline


def _reference_loss(model, exs):
    """Token-weighted mean of -log p over trained tokens, each example alone, float64 log-softmax."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in exs:
            logp = model(torch.tensor([ex["input_ids"]])).logits[0, :-1].double().log_softmax(-1)
            lab = torch.tensor(ex["labels"][1:])
            keep = lab != -100
            total -= logp[keep, lab[keep]].sum().item()
            n += int(keep.sum())
    return total / n, n


def _built(model, exs, tok):
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(quiet=True))
    return Built(model, make_task(exs, tok.pad_token_id), {"held": exs, "eval_batch": 2, "cfg": cfg})


def test_baseline_of_a_fresh_lora_model_is_the_untouched_model(setup):
    tok, exs, base, model, collate = setup
    ref, n = _reference_loss(base, exs)
    baseline = EXP.baseline(_built(model, exs, tok))
    assert baseline.kind == "un-adapted model" and baseline.metrics["eval_tokens"] == n
    assert baseline.score == baseline.metrics["eval_loss"] == pytest.approx(ref, rel=1e-5)
    assert baseline.metrics["eval_ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    with disable_adapters(model):  # the same number as the model with its adapters off
        assert E.scored_heldout_loss(model, exs, collate, 2)["eval_loss"] == pytest.approx(baseline.score, rel=1e-6)
    no_lora = EXP.baseline(_built(copy.deepcopy(base), exs, tok))  # full / bitfit before training: the model
    assert no_lora.score == pytest.approx(ref, rel=1e-5)


def test_baseline_of_a_trained_adapter_is_still_the_base_model(setup):
    tok, exs, base, model, collate = setup
    tuned = trained(model, exs, collate, steps=5)
    before = E.scored_heldout_loss(tuned, exs, collate, 2)
    baseline = EXP.baseline(_built(tuned, exs, tok))
    ref, _ = _reference_loss(base, exs)
    assert baseline.score == pytest.approx(ref, rel=1e-5)  # adapters off inside baseline()
    assert before["eval_loss"] < baseline.score  # trained on these very examples
    assert E.scored_heldout_loss(tuned, exs, collate, 2) == before  # the adapter is on again afterwards
    fine, n = _reference_loss(tuned, exs)
    assert before["eval_loss"] == pytest.approx(fine, rel=1e-5) and before["eval_tokens"] == n


# ----------------------------------------------------------------------------- generation

def greedy_reference(model, tok, prompt, max_new_tokens, ids_only=False):
    """One prompt, no padding, no KV cache: argmax of the full forward each step."""
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  tokenize=True)["input_ids"]
    eos = I.end_of_turn_ids(tok)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
    if ids_only:
        return out
    return tok.decode(out, skip_special_tokens=True).strip()


def test_batched_left_padded_generation_matches_one_by_one(setup):
    tok, exs, base, model, collate = setup
    tuned = random_adapter(model)
    prompts = E.STUDY_PROMPTS  # different lengths -> left padding inside the batch
    got = E.generate_ids(tuned, tok, prompts, max_new_tokens=8, batch_size=4)
    assert got == [greedy_reference(tuned, tok, p, 8, ids_only=True) for p in prompts]
    assert all(len(set(g)) >= 4 for g in got)  # varied tokens came out, not empty or constant replies
    assert E.generate(tuned, tok, prompts, max_new_tokens=8) == [tok.decode(g, skip_special_tokens=True).strip()
                                                                 for g in got]


def test_progress_bars_count_every_step_and_change_nothing(setup, capsys):
    tok, exs, base, model, collate = setup
    tuned = random_adapter(model)
    prompts = E.STUDY_PROMPTS[:3]
    quiet = E.generate_ids(tuned, tok, prompts, max_new_tokens=6, batch_size=2)
    capsys.readouterr()
    shown = E.generate_ids(tuned, tok, prompts, max_new_tokens=6, batch_size=2, progress="GSM8K (fine-tuned)")
    err = capsys.readouterr().err
    assert shown == quiet
    assert "GSM8K (fine-tuned)" in err and "12/12" in err  # 2 batches x 6 steps, counted to the end
    loss = E.scored_heldout_loss(tuned, exs, collate, batch_size=2, progress=True)
    err = capsys.readouterr().err
    steps = -(-len(exs) // 2)  # batches of 2
    assert "held-out loss" in err and f"{steps}/{steps}" in err
    assert loss == E.scored_heldout_loss(tuned, exs, collate, batch_size=2)


def test_side_by_side_base_column_is_the_base_model(setup):
    tok, exs, base, model, collate = setup
    tuned = random_adapter(model, seed=1, scale=0.5)
    rows = E.side_by_side(tuned, tok, E.STUDY_PROMPTS[:2], max_new_tokens=5)
    assert all(r["base"] != r["finetuned"] for r in rows)
    assert [r["prompt"] for r in rows] == E.STUDY_PROMPTS[:2]
    assert [r["base"] for r in rows] == [greedy_reference(base, tok, p, 5) for p in E.STUDY_PROMPTS[:2]]
    assert [r["finetuned"] for r in rows] == [greedy_reference(tuned, tok, p, 5) for p in E.STUDY_PROMPTS[:2]]


# ----------------------------------------------------------------------------- GSM8K scoring

@pytest.mark.parametrize("text, expected", [
    ("so she makes 9 * 2 = 18 dollars.\n#### 18", "18"),
    ("#### $1,000", "1000"),
    ("The answer is 18.00", "18"),
    ("It costs $3.50 each, so 2 cost $7.", "7"),
    ("Total: 1,234,567 apples", "1234567"),
    ("Temperature drops to -5 degrees", "-5"),
    ("#### 42\nLater I said 7", "42"),          # after #### wins over the last number
    ("#### none\nbut really 5", "5"),            # #### without a number: fall back to the last number
    ("no numbers here", None),
    ("0.50 of them", "0.5"),
    ("items 5, 6, and 7", "7"),
])
def test_extract_final_number(text, expected):
    assert E.extract_final_number(text) == expected


def test_every_shipped_gsm8k_reference_parses():
    recs = I.read_records(I.gsm8k_path())
    refs = [E.gsm8k_reference(r["answer"]) for r in recs]
    assert refs[0] == "18" and all(E.normalize_number(r) == r for r in refs)
    with pytest.raises(ValueError, match="no '#### <number>'"):
        E.gsm8k_reference("just text")


def test_gsm8k_exact_match_scoring(monkeypatch):
    problems = [{"question": "q1", "answer": "... #### 18"}, {"question": "q2", "answer": "#### 1,000"},
                {"question": "q3", "answer": "#### 7"}]
    outputs = {"q1": "She makes $18.", "q2": "#### 1000", "q3": "about 8 " + "a b c d e f g h " * 3}
    monkeypatch.setattr(E, "generate", lambda model, tok, qs, *a, **k: [outputs[q] for q in qs])
    words = lambda text, add_special_tokens=False: {"input_ids": text.split()}  # a word tokenizer
    out = E.gsm8k_exact_match(None, words, problems)
    assert out["exact_match"] == pytest.approx(2 / 3) and out["n"] == 3
    assert [r["prediction"] for r in out["records"]] == ["18", "1000", "8"]
    assert [r["answer_format"] for r in out["records"]] == [False, True, False]
    assert [r["loops"] for r in out["records"]] == [False, False, True]
    assert out["answer_format"] == pytest.approx(1 / 3) and out["looping"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- build -> fit -> report

def test_build_fit_report_end_to_end(tmp_path, monkeypatch):
    """A tiny Llama saved as a local model dir, GSM8K data, the baseline, the engine's fit, then report:
    the guard passes, fine-tuned held-out loss differs from the baseline's, files are written, and the
    Result carries the old result dict under details."""
    from loralab.engine.config import load_config
    from loralab.engine.trainer import fit

    tok = tiny_tokenizer()
    model_dir = tmp_path / "tiny-llama"
    _tiny_llama(len(tok), seed=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.delenv("LORALAB_JUDGE_URL", raising=False)
    cfg = load_config(None, [f"model.name={model_dir}", "data.train_samples=8", "data.eval_samples=3",
                             "data.max_length=1024", "train.max_steps=3", "train.batch_size=4", "train.lr=5e-3",
                             "train.quiet=true", "generate.max_new_tokens=4", "lora.r=4", "train.eval_every=2"],
                      preset="instruct-cpu")
    assert get_experiment("instruct") is EXP and EXP.sections == ("generate",)
    built = EXP.build(cfg)
    model, task = built.model, built.task
    assert len(task.train_dataset) == 8 and all(len(ex["input_ids"]) <= 1024 for ex in task.train_dataset)
    assert len(built.state["held"]) == 3 and task.metric == "eval_loss"  # eval_every > 0: selection on held-out
    with pytest.raises(E.AdapterNotPresentError):  # before training: B = 0
        E.assert_adapter_present(model, task.collate(task.train_dataset[:2]))
    built.baseline = EXP.baseline(built)
    ref, _ = _reference_loss(_tiny_llama(len(tok), seed=2), built.state["held"])
    assert built.baseline.score == pytest.approx(ref, rel=1e-5)  # the saved model, no adapter
    fitted = fit(model, task, cfg.train, run_dir=tmp_path / "run")
    result = EXP.report(built, fitted, tmp_path / "run")
    out = result.details
    assert out["adapter_check"]["max_logit_change"] > 0
    assert out["heldout"]["base_loss"] == built.baseline.score
    assert out["heldout"]["finetuned_loss"] != out["heldout"]["base_loss"]
    assert out["gsm8k"]["finetuned"]["n"] == 3 and out["gsm8k"]["base"]["n"] == 3
    assert [r["prompt"] for r in out["generations"]] == E.STUDY_PROMPTS
    assert out["judge"] == {"skipped": "LORALAB_JUDGE_URL not set"}
    for name in ("instruct_result.json", "generations.md", "summary.txt", "resources.json",
                 "adapter/adapter_model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    assert (result.experiment, result.main_metric, result.greater_is_better) == ("instruct", "eval_loss", False)
    assert result.score == out["heldout"]["finetuned_loss"]
    assert result.metrics["gsm8k_exact_match"] == out["gsm8k"]["finetuned"]["exact_match"]
    assert result.margin == pytest.approx(0.01 * built.baseline.score)
    assert result.learned is (built.baseline.score - result.score > result.margin)  # lower is better


@pytest.mark.parametrize("text, expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", True),
    ("So the total is $1,250.\n#### 1,250\n", True),
    ("#### -3.5", True),
    ("The answer is 7.", False),
    ("#### 7\nHe will plant 7 lemons.", False),  # the format line is not the end
    ("#### seven", False),
])
def test_ends_in_answer_format(text, expected):
    assert E.ends_in_answer_format(text) is expected


def test_loops_counts_an_8_gram_three_times_with_overlaps():
    sentence = list(range(10))
    assert E.loops(sentence * 3)
    assert not E.loops(sentence * 2 + sentence[:7])  # the third copy is cut before 8 tokens repeat
    assert E.loops([5] * 10)  # overlapping occurrences: 5^8 starts at 0, 1, 2
    assert not E.loops([5] * 9)
    assert not E.loops(list(range(100)))
