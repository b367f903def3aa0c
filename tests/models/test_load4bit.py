"""4-bit loading through the zoo: streamed on meta, equal to "load full precision, then quantize".

Oracle: the model loaded in full precision by transformers, then quantized in place by
loralab.core.linear4bit.quantize_model (itself tested bit-exact against bitsandbytes in tests/core).
"""
import pytest
import torch
from torch import nn

from loralab.models import zoo
from loralab.models.load4bit import SKIP_MODULES
from loralab.models.tiny import tiny_model

linear4bit = pytest.importorskip("loralab.core.linear4bit")


def _reference(path, kind, quant_type, double_quant, num_labels=None):
    model = zoo.load_model(str(path), kind, num_labels=num_labels)
    return linear4bit.quantize_model(model, quant_type, double_quant, skip_modules=SKIP_MODULES)


@pytest.mark.parametrize("arch, kind, quant_type, double_quant", [
    ("llama", "causal_lm", "nf4", True),
    ("llama", "seq_cls", "fp4", False),
    ("bert", "seq_cls", "int4", True),
    ("roberta", "seq_cls", "nf4", False),
    ("bert", "base", "nf4", True),
])
def test_streamed_4bit_equals_full_load_then_quantize(tmp_path, monkeypatch, arch, kind, quant_type, double_quant):
    source = tiny_model(arch, "causal_lm" if kind == "causal_lm" else "base", seed=4)
    source.save_pretrained(tmp_path / "m")
    num_labels = 3 if kind == "seq_cls" else None
    ref = _reference(tmp_path / "m", kind, quant_type, double_quant, num_labels)
    auto = zoo._auto_class(kind)
    # The 4-bit path must never build the full-precision model.
    monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: pytest.fail("from_pretrained called"))
    model = zoo.load_model(str(tmp_path / "m"), kind, num_labels=num_labels, quantize=quant_type,
                           double_quant=double_quant, compute_dtype=torch.float32)
    monkeypatch.undo()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, linear4bit.Linear4bit)}
    ref_layers = {n for n, m in ref.named_modules() if isinstance(m, linear4bit.Linear4bit)}
    assert set(layers) == ref_layers and layers
    assert all(m.quant_type == quant_type and (m.nested_absmax is not None) == double_quant
               for m in layers.values())
    info = model.loralab_load_info
    assert info["quantize"] == quant_type
    if kind == "seq_cls":
        head = {"llama": ["score.weight"], "bert": ["classifier.bias", "classifier.weight"],
                "roberta": ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                            "classifier.out_proj.weight"]}[arch]
        assert info["new_head"] == head
        head_module = model.get_submodule(head[0].split(".")[0])
        assert not any(isinstance(m, linear4bit.Linear4bit) for m in head_module.modules())
        # Same random head in both, so the outputs can be compared exactly.
        head_module.load_state_dict(ref.get_submodule(head[0].split(".")[0]).state_dict())
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids), ref(input_ids=ids)
    key = "last_hidden_state" if kind == "base" else "logits"
    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    # And the 4-bit weight is close to the saved one (NF4/FP4/Int4 blockwise error stays well below 20%).
    name = next(iter(layers))
    saved = dict(source.named_parameters())
    key_name = name + ".weight" if name + ".weight" in saved else name.split(".", 1)[-1] + ".weight"
    w = saved[key_name].detach()
    assert ((layers[name].dequantize() - w).norm() / w.norm()) < 0.2


def test_4bit_refuses_to_leave_heads_random_or_projections_unquantized(tmp_path):
    tiny_model("bert", "base").save_pretrained(tmp_path / "bert")
    with pytest.raises(RuntimeError, match="uninitialized.*cls.predictions"):
        zoo.load_model(str(tmp_path / "bert"), "causal_lm", quantize="nf4")
    tiny_model("gpt2", "causal_lm").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(NotImplementedError, match="Conv1D"):
        zoo.load_model(str(tmp_path / "gpt2"), "causal_lm", quantize="nf4")


def test_minilm_in_nf4_keeps_its_sentence_geometry():
    full = zoo.load_model("minilm-l6", "base")
    q = zoo.load_model("minilm-l6", "seq_cls", num_labels=2, quantize="nf4", compute_dtype=torch.float32)
    assert isinstance(q.classifier, nn.Linear) and q.classifier.weight.dtype == torch.float32
    assert isinstance(q.bert.encoder.layer[0].attention.self.query, linear4bit.Linear4bit)
    tok = zoo.load_tokenizer("minilm-l6")
    enc = tok(["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = full(**enc).last_hidden_state, q.bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pool = lambda h: torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # noqa: E731
    ea, eb = pool(a), pool(b)
    assert (ea * eb).sum(-1).min() > 0.95  # each sentence keeps its direction
    assert eb[0] @ eb[1] > eb[0] @ eb[2]


@pytest.mark.slow
def test_smollm2_in_nf4_still_speaks_english():
    tok = zoo.load_tokenizer("smollm2-135m")
    model = zoo.load_model("smollm2-135m", "causal_lm", quantize="nf4", double_quant=True)
    assert sum(isinstance(m, linear4bit.Linear4bit) for m in model.modules()) == 30 * 7
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, kept in full precision

    def perplexity(text):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(ids, labels=ids).loss.exp().item()

    ppl = perplexity("The cat sat on the mat. It was a sunny day, and the children were playing in the park.")
    shuffled = perplexity("mat the park. sat playing were day, cat and It sunny on children The the a was in the.")
    assert ppl < 40 and shuffled > 10 * ppl, (ppl, shuffled)
