"""common.linear_ce: the chunked head + cross-entropy against float64 logits and autograd, and the
causal-LM loss taking the fused path (or not) exactly where the model allows it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loralab.models.tiny import tiny_model
from loralab.tasks.common.batches import IGNORE
from loralab.tasks.common.causal_lm import fused_head, token_loss_sum
from loralab.tasks.common.linear_ce import linear_cross_entropy


def _reference(h, w, y, eps):
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy(hd @ wd.T, y, ignore_index=IGNORE, reduction="sum", label_smoothing=eps)
    loss.backward()
    return loss, hd.grad, wd.grad


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("rows", [3, 64])
def test_matches_float64_cross_entropy_and_gradients(eps, rows):
    torch.manual_seed(0)
    h = torch.randn(21, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.5).requires_grad_()
    y = torch.randint(0, 50, (21,))
    y[[0, 4, 5, 20]] = IGNORE
    loss = linear_cross_entropy(h, w, y, eps, rows=rows)
    (2.5 * loss).backward()
    ref, gh, gw = _reference(h, w, y, eps)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(h.grad.double(), 2.5 * gh, atol=1e-5)
    assert torch.allclose(w.grad.double(), 2.5 * gw, atol=1e-5)
    assert h.grad[[0, 4, 5, 20]].abs().max() == 0  # unlabelled rows get no gradient


def test_bf16_inputs_stay_within_bf16_rounding():
    """bf16 h and W: logits rounded once to bf16 (|z| ~ 4: error <= 2^-7 each), the rest in float32."""
    torch.manual_seed(1)
    h = torch.randn(40, 32).bfloat16().requires_grad_()
    w = (torch.randn(300, 32) * 0.3).bfloat16()
    y = torch.randint(0, 300, (40,))
    loss = linear_cross_entropy(h, w, y)
    loss.backward()
    ref, gh, _ = _reference(h, w, y, 0.0)
    assert h.grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) / ref.item() < 2 ** -8
    assert float((h.grad.double() - gh).norm() / gh.norm()) < 2 ** -6


def test_no_grad_computes_only_the_loss():
    h, w, y = torch.randn(8, 4), torch.randn(10, 4), torch.randint(0, 10, (8,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y)
    ref, _, _ = _reference(h, w, y, 0.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_token_loss_takes_the_fused_path_and_equals_the_logits_path(arch, monkeypatch):
    model = tiny_model(arch, "causal_lm", seed=3)
    assert fused_head(model) is not None
    batch = {"input_ids": torch.tensor([[5, 9, 14, 3, 22, 7], [8, 30, 2, 17, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])}
    batch["labels"] = torch.tensor([[IGNORE, IGNORE, 14, 3, 22, 7], [IGNORE, 30, IGNORE, 17, IGNORE, IGNORE]])
    calls = []
    real = linear_cross_entropy
    monkeypatch.setattr("loralab.tasks.common.causal_lm.linear_cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, n = token_loss_sum(model, batch, 0.1)
    assert calls and n == 6
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=IGNORE, reduction="sum", label_smoothing=0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_models_the_fused_path_must_not_take():
    model = tiny_model("llama", "causal_lm", seed=3)
    model.register_forward_pre_hook(lambda m, a: None)  # e.g. prefix embeddings rewriting the inputs
    assert fused_head(model) is None
    model = tiny_model("llama", "causal_lm", seed=3)
    model.lm_head = nn.Sequential(model.lm_head)  # a wrapped head (LoRA on lm_head, modules_to_save)
    assert fused_head(model) is None
    model = tiny_model("gpt2", "causal_lm", seed=3, tie_word_embeddings=False)
    model.config.final_logit_softcapping = 30.0
    assert fused_head(model) is None
