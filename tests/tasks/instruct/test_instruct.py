"""Instruction data: formats -> conversations, template rendering, assistant-only masks, packing, GSM8K split."""
import json

import pytest
import torch

from loralab.tasks.common.batches import make_collate
from loralab.tasks.common.causal_lm import block_causal_mask, token_loss_sum
from loralab.tasks.instruct import data as I
from loralab.tasks.instruct.eval import scored_heldout_loss
from loralab.tasks.instruct.experiment import load_split_records, make_task

LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_STYLE = (  # writes a "\n" after <|im_end|>: the separator must not be trained
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(template: str = LLAMA_STYLE):
    """Byte-level tokenizer (one token per byte, no merges) + Llama-3 / ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|eot_id|>" if template is LLAMA_STYLE else "<|im_end|>"
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token=eos,
                                pad_token="<|pad|>", additional_special_tokens=[
                                    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
                                    "<|im_end|>"])
    t.chat_template = template
    return t


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def kept_spans(tokenizer, ex):
    spans, cur = [], []
    for tid, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != -100:
            assert lab == tid
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tokenizer.decode(s) for s in spans]


# ----------------------------------------------------------------------------- formats

def test_alpaca_with_and_without_input():
    recs = [{"instruction": " Add. ", "input": "2 and 3", "output": "5 "},
            {"instruction": "Say hi", "input": "", "output": "hi"}]
    assert I.to_conversations(recs) == [
        [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]]


def test_messages_and_sharegpt_and_system_prompt():
    recs = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "dangling"}]}]
    assert I.to_conversations(recs, system_prompt="S") == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    share = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}]
    assert I.to_conversations(share) == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]]
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        I.to_conversations([{"messages": [{"role": "robot", "content": "x"}]}])


def test_prompt_completion_longform_question_answer():
    assert I.to_conversations([{"prompt": "P", "completion": " C"}]) == [
        [{"role": "user", "content": "P"}, {"role": "assistant", "content": "C"}]]
    assert I.to_conversations([{"input": "I", "output": "O"}]) == [
        [{"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}]]
    assert I.to_conversations([{"question": "Q", "answer": "A\n#### 3"}]) == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A\n#### 3"}]]


def test_oig_chip2_multi_turn():
    rec = {"text": "<human>: Hi there\n<bot>: Hello!\n<human>: 2+2?\n<bot>: 4"}
    assert I.to_conversations([rec]) == [[
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]


def test_hh_rlhf_uses_chosen():
    rec = {"chosen": "\n\nHuman: How are you?\n\nAssistant: Fine.\n\nHuman: Sure?\n\nAssistant: Yes, sure.",
           "rejected": "\n\nHuman: How are you?\n\nAssistant: Go away."}
    assert I.to_conversations([rec]) == [[
        {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, sure."}]]


OASST = [  # root -> two assistant replies (rank 1, rank 0); the rank-0 one has a prompter follow-up + reply
    {"message_id": "r", "parent_id": None, "role": "prompter", "text": "Q"},
    {"message_id": "a1", "parent_id": "r", "role": "assistant", "text": "A-second", "rank": 1},
    {"message_id": "a0", "parent_id": "r", "role": "assistant", "text": "A-best", "rank": 0},
    {"message_id": "p2", "parent_id": "a0", "role": "prompter", "text": "More?"},
    {"message_id": "a2", "parent_id": "p2", "role": "assistant", "text": "More."},
    {"message_id": "p3", "parent_id": "a1", "role": "prompter", "text": "unanswered"},
    {"message_id": "x", "parent_id": "r", "role": "assistant", "text": "deleted", "deleted": True},
]


def test_oasst_leaves_and_best():
    u, a = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    leaves = I.to_conversations(OASST)
    assert leaves == [[u("Q"), a("A-second")], [u("Q"), a("A-best"), u("More?"), a("More.")]]
    assert I.to_conversations(OASST, oasst_mode="best") == [[u("Q"), a("A-best"), u("More?"), a("More.")]]


def test_detect_format_and_override(tmp_path):
    assert I.detect_format({"instruction": 1, "input": 2, "output": 3}) == "alpaca"
    assert I.detect_format({"input": 1, "output": 2}) == "longform"
    assert I.detect_format({"text": "<human>: a <bot>: b"}) == "oig_chip2"
    with pytest.raises(ValueError, match="cannot detect"):
        I.detect_format({"foo": 1})
    with pytest.raises(ValueError, match="lacks key"):
        I.to_conversations([{"input": "I", "output": "O"}], format="alpaca")
    # explicit override wins over detection: an alpaca-keyed record read as longform would fail, prompt/completion ok
    recs = [{"prompt": "p", "completion": "c", "text": "<human>: x <bot>: y"}]
    assert I.to_conversations(recs, format="oig_chip2")[0][0]["content"] == "x"


def test_read_local_files(tmp_path):
    recs = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.csv").write_text("prompt,completion\np1,c1\np2,c2\n")
    for name in ("a.jsonl", "a.json", "a.csv"):
        assert I.read_records(tmp_path / name) == recs
    with pytest.raises(FileNotFoundError):
        I.read_records(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- templates and masks

@pytest.mark.parametrize("template, end", [(LLAMA_STYLE, "<|eot_id|>"), (CHATML_STYLE, "<|im_end|>")])
def test_assistant_mask_exact(template, end):
    tok = tiny_tokenizer(template)
    ex = I.tokenize_conversation(tok, CONV)
    full = tok.apply_chat_template(CONV, tokenize=True)["input_ids"]
    assert ex["input_ids"] == list(full)
    assert kept_spans(tok, ex) == ["Hello there" + end, "4" + end]
    # the whole rendering decodes back to the template's text
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CONV, tokenize=False)


def test_train_on_all_and_llama3_fallback():
    tok = tiny_tokenizer()
    ex = I.tokenize_conversation(tok, CONV, train_on="all")
    assert ex["labels"] == ex["input_ids"]
    tok.chat_template = None  # no template of its own -> Llama-3's
    ex = I.tokenize_conversation(tok, CONV)
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert kept_spans(tok, ex) == ["Hello there<|eot_id|>", "4<|eot_id|>"]
    with pytest.raises(ValueError, match="train_on"):
        I.tokenize_conversation(tok, CONV, train_on="prompt")


def test_history_rewriting_template_is_refused():
    # renders only the last assistant turn's content: prefixes are not stable
    bad = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] + '<|eot_id|>' }}"
           "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    with pytest.raises(ValueError, match="not prefix-stable"):
        I.tokenize_conversation(tiny_tokenizer(), CONV, chat_template=bad)


def test_truncation_and_dropping():
    tok = tiny_tokenizer()
    full = I.tokenize_conversation(tok, CONV)
    first_label = next(i for i, lab in enumerate(full["labels"]) if lab != -100)
    cut = I.tokenize_conversation(tok, CONV, max_length=first_label + 3)
    assert cut["input_ids"] == full["input_ids"][: first_label + 3]
    assert kept_spans(tok, cut) == ["Hel"]
    assert I.tokenize_conversation(tok, CONV, max_length=first_label) is None  # nothing left to train on
    assert len(I.tokenize_all(tok, [CONV, CONV], max_length=first_label)) == 0


# ----------------------------------------------------------------------------- packing

def _tiny_llama(vocab: int, seed: int = 0, impl: str = "eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval()


def test_packing_layout_and_masks():
    exs = [{"input_ids": [1, 2, 3], "labels": [1, -100, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
           {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9]}]
    rows = I.pack_examples(exs, max_length=6)
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1],
         "segment_ids": [0, 0, 0, 1, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9], "position_ids": [0, 1, 2, 3],
         "segment_ids": [0, 0, 0, 0]}]
    m = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]), torch.float32)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(m, expected.bool())
    with pytest.raises(ValueError, match="exceeds max_length"):
        I.pack_examples(exs, max_length=3)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked_reference(impl):
    """Sum of -log p over trained tokens: packed batch == each example alone (float64 log-softmax)."""
    tok = tiny_tokenizer()
    convs = [CONV, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}],
             [{"role": "user", "content": "long question " * 3}, {"role": "assistant", "content": "ok"}]]
    exs = I.tokenize_all(tok, convs)
    model = _tiny_llama(len(tok), impl=impl)
    ref_sum, ref_n = 0.0, 0
    with torch.no_grad():
        for ex in exs:
            ids = torch.tensor([ex["input_ids"]])
            logp = model(ids).logits[0, :-1].double().log_softmax(-1)
            lab = torch.tensor(ex["labels"][1:])
            keep = lab != -100
            ref_sum -= logp[keep, lab[keep]].sum().item()
            ref_n += int(keep.sum())
        rows = I.pack_examples(exs, max_length=sum(len(e["input_ids"]) for e in exs[:2]))
        assert len(rows) == 2 and rows[0]["segment_ids"][-1] == 1
        batch = make_collate(tok.pad_token_id)(rows)
        assert batch["segment_ids"][1, -1] == -1  # the shorter row is padded
        loss, n = token_loss_sum(model, batch)
    assert n == ref_n
    assert loss.item() == pytest.approx(ref_sum, rel=1e-5)


def test_task_loss_is_token_mean_and_heldout_evaluation():
    tok = tiny_tokenizer()
    exs = I.tokenize_all(tok, [CONV, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}]])
    model = _tiny_llama(len(tok))
    task = make_task(exs, tok.pad_token_id)
    batch = task.collate(exs)
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(e["input_ids"]) for e in exs]))
    assert task.tokens(batch) == sum(len(e["input_ids"]) for e in exs)  # throughput counts real tokens
    with torch.no_grad():
        total, n = token_loss_sum(model, batch)
        assert task.loss(model, batch).item() == pytest.approx(total.item() / n)
    # no mid-run selection unless build() asks for it (see the end-to-end test); the held-out score:
    assert task.metric is None and task.evaluate is None and task.greater_is_better is False
    metrics = scored_heldout_loss(model, exs, task.collate, batch_size=1)
    assert metrics["eval_loss"] == pytest.approx(total.item() / n, rel=1e-6)
    assert metrics["eval_ppl"] == pytest.approx(torch.tensor(total.item() / n).exp().item(), rel=1e-6)


# ----------------------------------------------------------------------------- GSM8K

def test_gsm8k_split_deterministic_disjoint_and_sized():
    train, held = I.gsm8k_records("train"), I.gsm8k_records("heldout")
    assert len(train) + len(held) == 1319
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert 0.15 < len(held) / 1319 < 0.25  # ~20% by construction of the hash buckets
    assert I.gsm8k_records("heldout") == held  # pure function of the question text
    import hashlib
    q = held[0]["question"]
    assert int(hashlib.sha256(q.strip().encode()).hexdigest()[:8], 16) % 1000 < 200
    convs = I.to_conversations(held[:2])
    assert convs[0][1]["content"].strip().split("####")[-1].strip() == held[0]["answer"].split("####")[-1].strip()
    with pytest.raises(ValueError, match="train' or 'heldout"):
        I.gsm8k_records("test")


def test_hub_source_without_datasets_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="needs the 'datasets' package"):
        I.read_records("OpenAssistant/oasst1:validation")


# ----------------------------------------------------------------------------- config: data selection, presets

def test_generic_dataset_split_and_subsampling(tmp_path):
    from loralab.engine.config import load_config

    recs = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(400)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(recs))
    cfg = load_config(None, ["experiment=instruct", "data.task=auto", f"data.train_file={path}"])
    train, held, fmt, _ = load_split_records(cfg)
    assert fmt == "auto" and len(train) + len(held) == 400 and 5 <= len(held) <= 40
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    cfg = load_config(None, ["experiment=instruct", "data.task=alpaca", f"data.train_file={path}",
                             "data.train_samples=10", "data.eval_samples=3", "data.seed=1"])
    t1, h1, _, _ = load_split_records(cfg)
    assert len(t1) == 10 and h1 == held[:3] and t1 == load_split_records(cfg)[0]  # seeded, repeatable
    assert {r["instruction"] for r in t1} <= {r["instruction"] for r in train}
    for bad, msg in ((["data.task=alpaca"], "set it"), (["data.task=yaml", f"data.train_file={path}"], "expected"),
                     (["data.task=oasst", f"data.train_file={path}"], "eval_file")):
        with pytest.raises(ValueError, match=msg):
            load_split_records(load_config(None, ["experiment=instruct"] + bad))


def test_qlora_preset_is_the_papers_recipe():
    from loralab.engine.config import load_config

    cfg = load_config(preset="qlora")
    assert (cfg.experiment, cfg.model.quantize, cfg.model.double_quant, cfg.model.compute_dtype) == (
        "instruct", "nf4", True, "bfloat16")
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout, cfg.lora.target_modules) == (64, 16.0, 0.1,
                                                                                         "all-linear")
    assert (cfg.train.lr, cfg.train.schedule, cfg.train.warmup_ratio, cfg.train.max_grad_norm,
            cfg.train.optimizer) == (2e-4, "constant", 0.03, 0.3, "paged_adamw")
    assert cfg.model.gradient_checkpointing and cfg.data.loss_on == "assistant"
    large = load_config(preset="qlora-large")
    assert (large.lora.lora_dropout, large.train.lr) == (0.05, 1e-4)
    cpu = load_config(preset="instruct-cpu")
    assert (cpu.model.name, cpu.model.quantize, cpu.lora.r, cpu.train.batch_size) == ("smollm2-135m", "none", 16, 4)
    assert load_config(preset="instruct-cpu-nf4").model.quantize == "nf4"
