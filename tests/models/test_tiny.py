"""Tiny configs, models and tokenizers: sizes, determinism, and ids that fit together."""
import pytest
import torch

from loralab.models.tiny import ARCHS, CHARS, tiny_config, tiny_model, tiny_tokenizer

KINDS = {"bert": ("base", "seq_cls"), "roberta": ("base", "seq_cls"),
         "gpt2": ("base", "seq_cls", "causal_lm"), "llama": ("base", "seq_cls", "causal_lm")}


@pytest.mark.parametrize("arch", ARCHS)
def test_config_is_tiny_and_overridable(arch):
    cfg = tiny_config(arch)
    assert cfg.model_type == arch and cfg.vocab_size == 128
    assert cfg.hidden_size == 32 and cfg.num_hidden_layers == 2
    assert tiny_config(arch, num_hidden_layers=1).num_hidden_layers == 1


@pytest.mark.parametrize("arch, kind", [(a, k) for a in ARCHS for k in KINDS[a]])
def test_models_build_run_and_are_seeded(arch, kind):
    tok = tiny_tokenizer(arch)
    torch.manual_seed(123)
    before = torch.rand(1)
    model = tiny_model(arch, kind, seed=7, num_labels=3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # tiny_model left the global RNG alone
    assert not model.training and sum(p.numel() for p in model.parameters()) < 200_000
    same = tiny_model(arch, kind, seed=7, num_labels=3).state_dict()
    other = tiny_model(arch, kind, seed=8, num_labels=3).state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state if state[k].is_floating_point())
    batch = tok(["Hello there!", "A longer second example."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    if kind == "seq_cls":
        assert out.logits.shape == (2, 3)
    elif kind == "causal_lm":
        assert out.logits.shape == (*batch["input_ids"].shape, 128)
    with pytest.raises(ValueError, match="kind"):
        tiny_model(arch, "mlm")


def test_causal_lm_needs_a_decoder():
    with pytest.raises(ValueError, match="decoder"):
        tiny_model("bert", "causal_lm")
    with pytest.raises(ValueError, match="arch"):
        tiny_config("t5")


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_is_character_level_and_matches_the_config(arch):
    tok, cfg = tiny_tokenizer(arch), tiny_config(arch)
    assert len(tok) <= cfg.vocab_size
    assert tok.pad_token_id == cfg.pad_token_id
    if arch != "bert":
        assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)
    text = "Hi, you!\nOK"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert len(set(tok.convert_ids_to_tokens(tok("".join(CHARS[:50]), add_special_tokens=False).input_ids))) == 50
    assert tok("é", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_pair_encodings_follow_each_family():
    bert_tok = tiny_tokenizer("bert")
    bert = bert_tok("ab", "c")
    assert bert_tok.convert_ids_to_tokens(bert.input_ids) == ["[CLS]", "a", "b", "[SEP]", "c", "[SEP]"]
    assert bert.token_type_ids == [0, 0, 0, 0, 1, 1]
    rob = tiny_tokenizer("roberta")
    enc = rob("ab", "c").input_ids
    assert rob.convert_ids_to_tokens(enc) == ["<s>", "a", "b", "</s>", "</s>", "c", "</s>"]
    gpt = tiny_tokenizer("gpt2")
    assert gpt.convert_ids_to_tokens(gpt("ab").input_ids) == ["a", "b"]


def test_llama_tokenizer_chat_template_and_special_tokens():
    tok = tiny_tokenizer("llama")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1  # specials are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\n"
