"""inject_adapter and model-level adapter management, against hand-built dense references and PEFT."""
import copy

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    RobertaConfig,
    RobertaModel,
)
from transformers.pytorch_utils import Conv1D

from loralab.core.config import LoraConfig
from loralab.core.inject import (
    ModulesToSaveWrapper,
    count_parameters,
    delete_adapter,
    disable_adapters,
    inject_adapter,
    lora_modules,
    mark_trainable,
    merge_adapters,
    set_adapter,
    trainable_report,
    unload,
    unmerge_adapters,
)
from loralab.core.lora import LoraLayer, LoraLinear

D = torch.float64
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_bert(cls=BertModel, **kw):
    return cls(BertConfig(**TINY_BERT, **kw)).to(D).eval()


def _randomize_B(model):
    with torch.no_grad():
        for _, layer in lora_modules(model):
            for lin in layer.lora_B.values():
                lin.weight.normal_(std=0.5)


def _dense_reference(base: nn.Module, lora_model: nn.Module, adapter: str) -> nn.Module:
    """A copy of the untouched base with W0 + scaling * B A written into each adapted weight by hand."""
    ref = copy.deepcopy(base)
    for name, layer in lora_modules(lora_model):
        if adapter not in layer.r:
            continue
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        delta = layer.scaling[adapter] * B @ A
        target = ref.get_submodule(name)
        with torch.no_grad():
            target.weight += delta.T if isinstance(target, Conv1D) else delta
    return ref


def test_parameter_counts_gpt2_medium_fused_qv_and_roberta_base():
    with torch.device("meta"):
        gpt2 = GPT2Model(GPT2Config(n_layer=24, n_embd=1024, n_head=16))
        roberta = RobertaModel(RobertaConfig())
    inject_adapter(gpt2, LoraConfig(r=4, lora_alpha=4, fused_qkv={"c_attn": [True, False, True]}))
    assert count_parameters(gpt2)[0] == 393_216
    inject_adapter(roberta, LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]))
    trainable, total = count_parameters(roberta)
    assert trainable == 294_912
    assert trainable_report(roberta) == f"trainable 294,912 of {total:,} ({100 * 294_912 / total:.2f}%)"


def test_bert_forward_equals_dense_reference_and_peft():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = tiny_bert()
    ids = torch.randint(0, 100, (2, 7))
    model = inject_adapter(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    _randomize_B(model)
    out = model(ids).last_hidden_state
    ref = _dense_reference(base, model, "default")(ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # PEFT as an independent oracle, with our weights copied in by PEFT's in-memory names
    peft = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(ours[name.removeprefix("base_model.model.")])
    torch.testing.assert_close(out, peft(ids).last_hidden_state, rtol=0, atol=1e-10)


def test_gpt2_fused_qv_matches_hand_built_slices():
    base = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)).to(D).eval()
    model = inject_adapter(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, fused_qkv={"c_attn": [True, False, True]}))
    _randomize_B(model)
    ref = copy.deepcopy(base)
    for name, layer in lora_modules(model):
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = torch.zeros(96, 32, dtype=D)
        delta[0:32] = B[0:32] @ A[0:2]  # q slice
        delta[64:96] = B[32:64] @ A[2:4]  # v slice
        with torch.no_grad():
            ref.get_submodule(name).weight += 2.0 * delta.T
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(model(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=0, atol=1e-10)


def test_only_adapter_modules_to_save_and_biases_get_gradients():
    model = tiny_bert(BertForSequenceClassification, num_labels=3).train()
    inject_adapter(model, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    _randomize_B(model)
    model(torch.randint(0, 100, (2, 5)), labels=torch.tensor([0, 2])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_A.default" in n or "lora_B.default" in n or "classifier.modules_to_save.default" in n)
               for n in with_grad)
    assert sum("classifier.modules_to_save.default" in n for n in with_grad) == 2  # weight and bias
    assert sum("lora_" in n for n in with_grad) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert not any("original_module" in n for n in with_grad)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes(bias):
    model = tiny_bert()
    inject_adapter(model, LoraConfig(r=2, target_modules=["query"], bias=bias))
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    all_biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    expected = {"none": set(), "all": all_biases,
                "lora_only": {f"encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(2)}}[bias]
    assert trainable_biases == expected


def test_suffix_matching_is_by_whole_components_and_regex_is_fullmatch():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(4, 4)
            self.myquery = nn.Linear(4, 4)
            self.block = nn.ModuleDict({"query": nn.Linear(4, 4), "query_proj": nn.Linear(4, 4)})

    model = inject_adapter(Net(), LoraConfig(target_modules=["query"]))
    assert sorted(n for n, _ in lora_modules(model)) == ["block.query", "query"]
    model = inject_adapter(Net(), LoraConfig(target_modules=r"block\.query.*"))
    assert sorted(n for n, _ in lora_modules(model)) == ["block.query", "block.query_proj"]
    model = inject_adapter(Net(), LoraConfig(target_modules=["query"], exclude_modules=["block.query"]))
    assert [n for n, _ in lora_modules(model)] == ["query"]


def test_nothing_matches_lists_candidates_and_containers_refused():
    model = tiny_bert()
    with pytest.raises(ValueError, match="matched no module") as err:
        inject_adapter(model, LoraConfig(target_modules=["qurey"]))
    for name in ("query", "key", "value", "intermediate.dense", "word_embeddings"):
        assert f"'{name}'" in str(err.value)
    with pytest.raises(ValueError, match="cannot wrap"):
        inject_adapter(model, LoraConfig(target_modules=["attention"]))


def test_rank_and_alpha_patterns():
    model = tiny_bert()
    inject_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                     rank_pattern={"value": 6}, alpha_pattern={r".*layer\.1\..*query": 1.0}))
    layers = dict(lora_modules(model))
    q0, q1, v0 = (layers[f"encoder.layer.{i}.attention.self.{m}"] for i, m in [(0, "query"), (1, "query"), (0, "value")])
    assert q0.r["default"] == 2 and q0.scaling["default"] == 2.0
    assert q1.scaling["default"] == 0.5
    assert v0.r["default"] == 6 and v0.lora_A["default"].weight.shape == (6, 32)
    assert v0.scaling["default"] == pytest.approx(4 / 6)


def test_all_linear_skips_tied_lm_head_and_modules_to_save():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16))
    inject_adapter(gpt2, LoraConfig(target_modules="all-linear"))
    names = {n for n, _ in lora_modules(gpt2)}
    assert "lm_head" not in names and len(names) == 2 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    bert = tiny_bert(BertForSequenceClassification, num_labels=2)
    inject_adapter(bert, LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    names = {n for n, _ in lora_modules(bert)}
    assert not any("classifier" in n for n in names) and len(names) == 2 * 6 + 1  # + pooler.dense
    assert isinstance(bert.classifier, ModulesToSaveWrapper)


def test_multiple_adapters_switch_disable_delete():
    base = tiny_bert()
    ids = torch.randint(0, 100, (2, 6))
    model = copy.deepcopy(base)
    inject_adapter(model, LoraConfig(r=2, lora_alpha=2, target_modules=["query", "value"]), "a")
    inject_adapter(model, LoraConfig(r=3, lora_alpha=6, target_modules=["query", "key"]), "b")
    assert set(model.lora_configs) == {"a", "b"}
    _randomize_B(model)
    base_out = base(ids).last_hidden_state
    refs = {n: _dense_reference(base, model, n)(ids).last_hidden_state for n in ("a", "b")}
    assert (refs["a"] - refs["b"]).abs().max() > 1e-3
    # the last injected adapter is the active, trainable one
    torch.testing.assert_close(model(ids).last_hidden_state, refs["b"], rtol=0, atol=1e-10)
    assert all(".b." not in n or p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    set_adapter(model, "a")
    torch.testing.assert_close(model(ids).last_hidden_state, refs["a"], rtol=0, atol=1e-10)
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"a"}
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).last_hidden_state, base_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(ids).last_hidden_state, refs["a"], rtol=0, atol=1e-10)
    with pytest.raises(RuntimeError, match="boom"), disable_adapters(model):
        raise RuntimeError("boom")
    torch.testing.assert_close(model(ids).last_hidden_state, refs["a"], rtol=0, atol=1e-10)
    delete_adapter(model, "a")
    assert "a" not in model.lora_configs and not any(".a." in n for n, _ in model.named_parameters())
    set_adapter(model, "b")
    torch.testing.assert_close(model(ids).last_hidden_state, refs["b"], rtol=0, atol=1e-10)
    with pytest.raises(KeyError, match="no adapter"):
        set_adapter(model, "a")
    with pytest.raises(ValueError, match="already has an adapter"):
        inject_adapter(model, LoraConfig(target_modules=["query"]), "b")


def test_merge_unmerge_unload_on_model():
    base = tiny_bert(BertForSequenceClassification, num_labels=3).float()
    ids = torch.randint(0, 100, (2, 6))
    model = inject_adapter(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query", "value", "intermediate.dense"],
                                                           modules_to_save=["classifier"]))
    _randomize_B(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    lora_out = model(ids).logits
    merge_adapters(model)
    assert all(layer._branch == () for _, layer in lora_modules(model))
    torch.testing.assert_close(model(ids).logits, lora_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        merge_adapters(model)
    with disable_adapters(model):  # unmerges for the duration, then merges back
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(layer.merged_adapters == ["default"] for _, layer in lora_modules(model))
    unmerge_adapters(model)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, W0[n], rtol=0, atol=1e-6)
    merged = unload(copy.deepcopy(model), merge=True)
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert type(merged.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert not hasattr(merged, "lora_configs")
    torch.testing.assert_close(merged(ids).logits, lora_out, rtol=1e-5, atol=1e-5)
    trained_head = model.classifier.modules_to_save["default"]
    plain = unload(model)  # unmerged: the base weights come back, the trained head stays (as in PEFT)
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in plain.modules())
    assert plain.classifier is trained_head
    base.classifier = trained_head
    torch.testing.assert_close(plain(ids).logits, base(ids).logits, rtol=0, atol=1e-6)


def test_unload_keeps_conv1d_and_mark_trainable():
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16))
    inject_adapter(gpt2, LoraConfig(target_modules=["c_attn"]), "x")
    assert isinstance(gpt2.h[0].attn.c_attn, LoraLinear) and gpt2.h[0].attn.c_attn.kind == "conv1d"
    for p in gpt2.parameters():
        p.requires_grad_(True)
    mark_trainable(gpt2, "x")
    assert count_parameters(gpt2)[0] == 8 * (32 + 96)
    unload(gpt2, merge=True)
    assert type(gpt2.h[0].attn.c_attn) is Conv1D


def test_bad_config_leaves_model_untouched():
    model = tiny_bert()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="modules_to_save entry 'clasifier'"):
        inject_adapter(model, LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))
    with pytest.raises(ValueError, match="not divisible"):
        inject_adapter(model, LoraConfig(target_modules=["key"], fused_qkv={"query": [True, False, True, False, True]}))
    with pytest.raises(ValueError, match="no '.'"):
        inject_adapter(model, LoraConfig(target_modules=["query"]), "v1.0")
    assert {n: type(m) for n, m in model.named_modules()} == before and not hasattr(model, "lora_configs")


def test_conv2d_and_embedding_targets_and_two_active_adapters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Linear(4 * 6 * 6, 3)

        def forward(self, ids):
            return self.head(self.conv(self.emb(ids).unsqueeze(1)).flatten(1))

    base = Net().to(D)
    model = copy.deepcopy(base)
    inject_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv"], init_lora_weights=False), "a")
    inject_adapter(model, LoraConfig(r=3, lora_alpha=3, target_modules=["conv", "head"], init_lora_weights=False), "b")
    set_adapter(model, ["a", "b"])
    ids = torch.randint(0, 20, (2, 6))
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in lora_modules(model):
            for n in layer.r:
                ref.get_submodule(name).weight += layer.delta_weight(n)  # delta_weight is checked per layer type
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=1e-10)
    assert {n.split(".")[-1] if "embedding" in n else n.split(".")[-2] for n, p in model.named_parameters()
            if p.requires_grad} == {"a", "b"}
    merge_adapters(model)
    plain = unload(model)  # already merged: the merged weights stay
    torch.testing.assert_close(plain(ids), ref(ids), rtol=0, atol=1e-10)
    assert type(plain.conv) is nn.Conv2d and type(plain.emb) is nn.Embedding


def test_gradient_checkpointing_replays_the_same_lora_dropout_mask():
    """Checkpointing recomputes the forward; the LoRA dropout mask must be redrawn identically (torch
    restores the RNG state), so the adapter gradients equal the non-checkpointed ones."""
    base = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    inject_adapter(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["query", "value"]))
    _randomize_B(base)
    ids, weights = torch.randint(0, 100, (2, 6)), torch.randn(2, 6, 32, dtype=D)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        (model(ids).last_hidden_state * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    torch.manual_seed(6)  # another mask gives other gradients: the comparison above can fail
    third = copy.deepcopy(base)
    (third(ids).last_hidden_state * weights).sum().backward()
    for name in grads[0]:
        assert grads[0][name].abs().max() > 1e-3
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-12)
    other = {n: p.grad for n, p in third.named_parameters() if p.requires_grad}
    assert max((other[n] - grads[0][n]).abs().max() for n in other) > 1e-3
