"""common.causal_lm: the label-smoothed token loss sum against a float64 hand computation, the
token-weighted mean, the block-diagonal causal mask of packed rows, and the held-out loss."""
import math

import pytest
import torch

from loralab.models.tiny import tiny_model
from loralab.tasks.common.batches import IGNORE, make_collate
from loralab.tasks.common.causal_lm import (block_causal_mask, forward_logits, heldout_loss, mean_token_loss,
                                            token_loss_sum)

ROWS = [  # labels: -100 on the "prompt"; the second row is shorter (padded)
    {"input_ids": [5, 9, 14, 3, 22, 7, 11], "labels": [IGNORE, IGNORE, IGNORE, 3, 22, 7, 11]},
    {"input_ids": [8, 30, 2, 17], "labels": [IGNORE, 30, IGNORE, 17]},
]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", "causal_lm", seed=5).eval()


def _hand_loss(model, rows, eps):
    """sum_t (1 - eps)(-log p(y_t)) + eps * mean_v(-log p(v)), each row alone, in float64."""
    total, n = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
            for t in range(len(row["input_ids"]) - 1):
                y = row["labels"][t + 1]
                if y == IGNORE:
                    continue
                logp = torch.log_softmax(logits[t], -1)
                total += float((1 - eps) * -logp[y] + eps * -logp.mean())
                n += 1
    return total, n


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_token_loss_sum_matches_float64_hand_computation(llama, eps):
    batch = make_collate(pad_id=0)(ROWS)
    with torch.no_grad():
        got, n = token_loss_sum(llama, batch, label_smoothing=eps)
        mean = mean_token_loss(llama, batch, label_smoothing=eps)
        per_row = [token_loss_sum(llama, make_collate(0)([r]), eps) for r in ROWS]
    ref, ref_n = _hand_loss(llama, ROWS, eps)
    assert n == ref_n == 4 + 2  # shifted labels that are not -100; padding adds none
    assert got.item() == pytest.approx(ref, rel=1e-5)
    assert mean.item() == pytest.approx(ref / ref_n, rel=1e-5)  # a token-weighted mean, not per example
    assert sum(float(s) for s, _ in per_row) == pytest.approx(got.item(), rel=1e-5)


def test_smoothing_changes_the_loss_and_a_batch_without_targets_is_an_error(llama):
    batch = make_collate(0)(ROWS)
    with torch.no_grad():
        assert token_loss_sum(llama, batch, 0.1)[0].item() != pytest.approx(token_loss_sum(llama, batch)[0].item())
    empty = make_collate(0)([{"input_ids": [1, 2, 3], "labels": [IGNORE, IGNORE, IGNORE]}])
    with pytest.raises(ValueError, match="no token to learn from"):
        mean_token_loss(llama, empty)


def test_block_causal_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    mask = block_causal_mask(seg, torch.float32)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.float32
    allowed = mask[:, 0] == 0
    expected0 = torch.tensor([[1, 0, 0, 0, 0, 0],
                              [1, 1, 0, 0, 0, 0],
                              [0, 0, 1, 0, 0, 0],  # a new example starts: it sees nothing before it
                              [0, 0, 1, 1, 0, 0],
                              [0, 0, 1, 1, 1, 0],
                              [0, 0, 0, 0, 0, 1]]).bool()  # a padding query sees itself only
    assert torch.equal(allowed[0], expected0)
    assert torch.equal(allowed[1], torch.ones(6, 6).tril().bool())  # one segment: plain causal
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert block_causal_mask(seg, torch.bfloat16).min() == torch.finfo(torch.bfloat16).min


def test_packed_row_logits_equal_each_example_alone(llama):
    a, b = [5, 9, 14, 3], [8, 30, 2]
    packed = make_collate(0)([{"input_ids": a + b, "segment_ids": [0] * 4 + [1] * 3,
                               "position_ids": [0, 1, 2, 3, 0, 1, 2]}])
    with torch.no_grad():
        logits = forward_logits(llama, packed)[0]
        alone = [llama(input_ids=torch.tensor([x])).logits[0] for x in (a, b)]
    torch.testing.assert_close(logits[:4], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[4:], alone[1], rtol=1e-4, atol=1e-5)
    # without the segments (plain causal mask) the second example would see the first
    plain = make_collate(0)([{"input_ids": a + b}])
    with torch.no_grad():
        assert not torch.allclose(forward_logits(llama, plain)[0, 4:], alone[1], atol=1e-3)


def test_heldout_loss_is_the_token_weighted_mean_and_restores_the_mode(llama):
    ref, n = _hand_loss(llama, ROWS, 0.0)
    llama.train()
    try:
        out = heldout_loss(llama, ROWS, make_collate(0), batch_size=1)
        assert llama.training
    finally:
        llama.eval()
    assert out["eval_tokens"] == n
    assert out["eval_loss"] == pytest.approx(ref / n, rel=1e-5)
    assert out["eval_ppl"] == pytest.approx(math.exp(ref / n), rel=1e-5)
    with pytest.raises(ValueError, match="no held-out tokens"):
        heldout_loss(llama, [{"input_ids": [1, 2], "labels": [IGNORE, IGNORE]}], make_collate(0))
