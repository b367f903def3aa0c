"""The training loop: exact resume after SIGKILL, Ctrl-C, accumulation, schedules, NaN handling,
keep-best and early stopping, length grouping, weight-decay groups."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from toy import ToyTrainConfig, toy_model, toy_task  # noqa: E402

from loralab.engine.checkpoint import latest_checkpoint  # noqa: E402
from loralab.engine.loop_utils import param_groups  # noqa: E402
from loralab.engine.schedule import lr_factor  # noqa: E402
from loralab.engine.trainer import NonFiniteLossError, epoch_order, fit  # noqa: E402

TOY = str(Path(__file__).parent / "toy.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_toy(tmp: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOY, "--run-dir", str(tmp / name), "--out", str(tmp / f"{name}.st"), *extra],
                          capture_output=True, text=True, env=ENV, timeout=120)


def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    full = _run_toy(tmp_path, "full")
    assert full.returncode == 0, full.stderr
    # 64 examples / batch 8 = 8 steps per epoch, 24 steps; checkpoints every 3 steps. Die inside step 11.
    killed = _run_toy(tmp_path, "crash", "--kill-after-loss-calls", "11")
    assert killed.returncode == -9, killed.stderr
    assert latest_checkpoint(tmp_path / "crash" / "checkpoints").name == "checkpoint-9"
    resumed = _run_toy(tmp_path, "crash", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(tmp_path / "full.st")), load_file(str(tmp_path / "crash.st"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-for-bit, not approximately


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path):
    full = _run_toy(tmp_path, "full", "--save-every", "0")
    stopped = _run_toy(tmp_path, "int", "--save-every", "0", "--sigint-after-loss-calls", "5")
    assert stopped.returncode == 0, stopped.stderr
    assert "STATUS interrupted 5" in stopped.stdout
    assert latest_checkpoint(tmp_path / "int" / "checkpoints").name == "checkpoint-5"
    resumed = _run_toy(tmp_path, "int", "--save-every", "0", "--resume")
    assert "STATUS completed 24" in resumed.stdout, resumed.stderr
    a, b = load_file(str(tmp_path / "full.st")), load_file(str(tmp_path / "int.st"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.returncode == 0


def test_gradient_accumulation_matches_one_big_batch():
    grads = []
    for accum in (1, 2, 4):
        model = toy_model(dropout=0.0)
        task = toy_task()
        cfg = ToyTrainConfig(grad_accum=accum, max_steps=1, lr=1e-3, max_grad_norm=0.0, warmup_ratio=0.0,
                             keep_best=False)
        task.evaluate = None
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        fit(model, task, cfg, optimizer=opt, log=lambda *a: None)
        grads.append([b - p.detach() for b, p in zip(before, model.parameters())])
    for other in grads[1:]:
        for g0, g in zip(grads[0], other):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_matches_formula(schedule):
    model = toy_model(dropout=0.0)
    task = toy_task()
    task.evaluate = None
    cfg = ToyTrainConfig(schedule=schedule, warmup_steps=3, max_steps=10, lr=0.1)
    seen = []
    orig = task.loss

    def spy(m, b):
        seen.append(opt.param_groups[0]["lr"])
        return orig(m, b)

    task.loss = spy
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, task, cfg, optimizer=opt, log=lambda *a: None)
    W, T = 3, 10
    for t, lr in enumerate(seen):
        if t < W:
            expect = 0.1 * t / W
        elif schedule == "linear":
            expect = 0.1 * (T - t) / (T - W)
        elif schedule == "cosine":
            expect = 0.1 * 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))
        else:
            expect = 0.1
        assert lr == pytest.approx(expect, abs=1e-12), (t, lr, expect)
    assert lr_factor(5, "constant", 0, 10) == 1.0


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    task = toy_task()

    def bad_loss(model, batch, calls=[0]):
        calls[0] += 1
        out = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        return out * float("nan") if calls[0] == 7 else out

    task.loss = bad_loss
    model = toy_model()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7.*checkpoint-6"):
        fit(model, task, ToyTrainConfig(save_every=3), run_dir=tmp_path, log=lambda *a: None)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "checkpoint-6"
    assert (tmp_path / "checkpoints" / "checkpoint-6" / "trainable.safetensors").exists()


def test_nan_loss_skipped_when_configured():
    task = toy_task()
    model = toy_model()
    orig = task.loss
    task.loss = lambda m, b, c=[0]: (c.__setitem__(0, c[0] + 1), orig(m, b) * (float("inf") if c[0] == 2 else 1))[1]
    res = fit(model, task, ToyTrainConfig(nan_policy="skip", max_steps=5), log=lambda *a: None)
    assert res.skipped_steps == 1 and res.global_step == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_keep_best_and_early_stopping():
    scores = [0.5, 0.9, 0.7, 0.6, 0.95]  # best at the 2nd evaluation; patience 2 stops at the 4th
    task = toy_task(eval_values=scores)
    model = toy_model()
    snapshots = {}
    orig = task.evaluate

    def spy(m):
        out = orig(m)
        snapshots[len(snapshots) + 1] = [p.detach().clone() for p in m.parameters()]
        return out

    task.evaluate = spy
    res = fit(model, task, ToyTrainConfig(eval_every=2, early_stopping_patience=2, max_steps=40),
              log=lambda *a: None)
    assert res.status == "early_stopped"
    assert res.best_metric == 0.9 and res.best_step == 4 and res.global_step == 8
    assert res.final_metrics == {"score": 0.9}
    for p, q in zip(model.parameters(), snapshots[2]):
        assert torch.equal(p, q)


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    lengths = [int(x) for x in torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    plain = epoch_order(1000, 0, 0, 16, None)
    grouped = epoch_order(1000, 0, 0, 16, lengths)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    pad = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert pad(grouped) < 0.2 * pad(plain)
    assert epoch_order(1000, 0, 0, 16, lengths) == grouped  # deterministic
    assert epoch_order(1000, 0, 1, 16, None) != plain  # reshuffled each epoch


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = param_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"0.weight", "2.weight"}


def test_empty_training_set_is_a_clear_error():
    task = toy_task(n=0)
    with pytest.raises(ValueError, match="training set is empty"):
        fit(toy_model(), task, ToyTrainConfig(), log=lambda *a: None)


def test_run_dir_gets_metrics_and_fit_json(tmp_path):
    res = fit(toy_model(), toy_task(), ToyTrainConfig(eval_every=4), run_dir=tmp_path, log=lambda *a: None)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len([l for l in lines if "train/loss" in l]) == res.global_step == 24
    assert any("eval/mse" in l for l in lines)
    assert (tmp_path / "fit.json").exists()
    assert res.train_tokens == 24 * 8 - 0 and res.tokens_per_second > 0


def test_tensorboard_logging_mirrors_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = fit(toy_model(), toy_task(), ToyTrainConfig(max_steps=6, eval_every=3, tensorboard=True),
              run_dir=tmp_path, log=lambda *a: None)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    jsonl = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r["train/loss"] for r in jsonl if "train/loss" in r], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/mse")] == [3, 6] and res.global_step == 6
