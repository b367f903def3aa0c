"""common.setup: what trains per method, counted against explicit formulas (and PEFT as an oracle for
LoRA), the W_q/W_v target translation, and the warm start: a loaded adapter is trainable, equal to the
file, and moves when trained."""
import re
import types

import pytest
import torch

from loralab.engine.schema import LoraSection
from loralab.tasks.common import setup as GM


def apply(model, method="lora", heads=("classifier",), **lora):
    """apply_method for a sequence classifier whose head is ``heads``."""
    return GM.apply_method(model, LoraSection(method=method, **lora), "SEQ_CLS", list(heads))

H, L, I, V, P, T = 32, 2, 64, 128, 128, 2  # tiny BERT: hidden, layers, FFN, vocab, positions, segment types


def _bert(num_labels=2, seed=0):
    from loralab.models.tiny import tiny_model

    model = tiny_model("bert", "seq_cls", seed=seed, num_labels=num_labels)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size,
            c.max_position_embeddings, c.type_vocab_size) == (H, L, I, V, P, T)
    return model


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("r,C", [(8, 2), (4, 3), (2, 1)])
def test_lora_count(r, C):
    model = _bert(C)
    info = apply(model, r=r, lora_alpha=8.0)
    expected = L * 2 * (r * H + H * r) + (H * C + C)  # A, B of query and value per layer + classifier
    assert info["trainable"] == _trainable(model) == expected
    assert info["target_modules"] == ["query", "value"] and info["modules_to_save"] == ["classifier"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("classifier.") for n in names)


def test_lora_count_matches_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = _bert(3), _bert(3)
    apply(ours, r=8, lora_alpha=8.0)
    ref = peft.get_peft_model(theirs, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"], task_type="SEQ_CLS"))
    assert _trainable(ours) == sum(p.numel() for p in ref.parameters() if p.requires_grad)


def test_bitfit_count():
    C = 2
    model = _bert(C)
    info = apply(model, "bitfit")
    per_layer = 3 * H + H + H + I + H + H  # q,k,v; attn out dense; attn LayerNorm; FFN in; FFN out; LayerNorm
    expected = L * per_layer + H + H + (H * C + C)  # + embedding LayerNorm + pooler + classifier
    assert info["trainable"] == _trainable(model) == expected
    assert all(n.endswith("bias") or n.startswith("classifier.") for n, p in model.named_parameters() if p.requires_grad)


def test_full_count():
    C = 3
    model = _bert(C)
    info = apply(model, "full")
    embeddings = V * H + P * H + T * H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
    expected = embeddings + L * layer + (H * H + H) + (H * C + C)
    assert info["trainable"] == info["total"] == _trainable(model) == expected


def test_roberta_head_and_mpnet_targets():
    from loralab.models.tiny import tiny_model
    from transformers import MPNetConfig, MPNetForSequenceClassification

    rob = tiny_model("roberta", "seq_cls", num_labels=2)
    info = apply(rob, r=4, lora_alpha=8.0)
    # RoBERTa's head: dense H x H + out_proj H x C
    assert info["trainable"] == L * 2 * (4 * H + H * 4) + (H * H + H) + (H * 2 + 2)
    torch.manual_seed(0)
    mp = MPNetForSequenceClassification(MPNetConfig(vocab_size=64, hidden_size=H, num_hidden_layers=L,
                                                    num_attention_heads=4, intermediate_size=I, num_labels=2))
    info = apply(mp, r=4, lora_alpha=8.0)  # config default ["query", "value"]
    assert info["target_modules"] == ["q", "v"]
    assert info["trainable"] == L * 2 * (4 * H + H * 4) + (H * H + H) + (H * 2 + 2)
    explicit = GM.qv_targets(mp, LoraSection(target_modules=["q", "k", "v"]))
    assert explicit == (["q", "k", "v"], {})  # an explicit choice is kept as given


def test_unknown_method_and_missing_head():
    with pytest.raises(ValueError, match="lora.method must be one of"):  # the section refuses it first, too
        GM.apply_method(_bert(), types.SimpleNamespace(method="prefix"), "SEQ_CLS", ["classifier"])
    with pytest.raises(ValueError, match=re.escape("lora.method: expected 'lora' | 'full' | 'bitfit'")):
        LoraSection(method="prefix")
    model = _bert()
    with pytest.raises(ValueError, match="no head module"):
        apply(model, "bitfit", heads=["score"])


# ---------------------------------------------------------------- warm start


def _train_steps(model, steps=3, num_labels=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(5, 100, (4, 12), generator=g)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        if num_labels == 1:
            loss = logits.pow(2).mean()
        else:
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1]) % num_labels)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("target_labels", [3, 2, 1])
def test_warm_start_loads_trainable_and_keeps_training(tmp_path, target_labels, capsys):
    from loralab.core.adapter_io import save_adapter

    source = _bert(3, seed=0)  # e.g. the MNLI adapter
    apply(source, r=4, lora_alpha=8.0)
    _train_steps(source, num_labels=3)
    save_adapter(source, tmp_path / "mnli", adapter_name="default")
    saved = {n: p.detach().clone() for n, p in _lora_params(source).items()}
    assert any(p.abs().sum() > 0 for n, p in saved.items() if "lora_B" in n)  # B moved off zero

    target = _bert(target_labels, seed=1)  # e.g. RTE (2), STS-B (1), or another 3-way task
    info = apply(target, r=8, lora_alpha=16.0, init_from=str(tmp_path / "mnli"))["warm_start"]
    assert (info["r"], info["lora_alpha"]) == (4, 8.0)  # the saved adapter's settings, not the section's
    assert info["init_from"] == str((tmp_path / "mnli").resolve())
    loaded = _lora_params(target)
    assert set(loaded) == set(saved)
    for n, p in loaded.items():
        assert p.requires_grad, f"{n} loaded frozen"
        assert torch.equal(p.detach(), saved[n]), f"{n} differs from the saved adapter"
    head = target.classifier.modules_to_save["default"]
    assert head.weight.requires_grad and head.weight.shape[0] == target_labels
    if target_labels == 3:
        assert info["head_loaded"] and torch.equal(head.weight, source.classifier.modules_to_save["default"].weight)
    else:
        assert not info["head_loaded"]
        err = capsys.readouterr().err
        assert "head is re-created" in err and "(3, 32)" in err  # the saved head was MNLI's 3 x H
    _train_steps(target, num_labels=target_labels)
    moved = [n for n, p in _lora_params(target).items() if not torch.equal(p.detach(), saved[n])]
    assert len(moved) == len(saved), f"unchanged after training: {sorted(set(saved) - set(moved))}"


def test_warm_start_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        apply(_bert(), r=4, init_from=str(tmp_path / "nope"))
    # full fine-tuning saves no adapter dir to warm start from: the config refuses the key (it would not be read)
    from loralab.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="lora.init_from: not read with lora.method=full"):
        load_config(overrides=["experiment=glue", "lora.method=full", f"lora.init_from={tmp_path / 'nope'}"])
