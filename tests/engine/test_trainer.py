"""The training loop: exact resume after SIGKILL, Ctrl-C and SIGTERM (real processes), keep-best runs
resumed after their best step, accumulation, schedules, NaN losses and evaluations, divergence,
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
from loralab.engine.trainer import NonFiniteLossError, NonFiniteMetricError, TrainState, epoch_order, fit  # noqa: E402

TOY = str(Path(__file__).parent / "toy.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_toy(tmp: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOY, "--run-dir", str(tmp / name), "--out", str(tmp / f"{name}.st"), *extra],
                          capture_output=True, text=True, env=ENV, timeout=120)


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)  # bit-for-bit, not approximately


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The uninterrupted toy run's final weights (checkpoints don't touch the RNG: any save_every)."""
    tmp = tmp_path_factory.mktemp("full")
    full = _run_toy(tmp, "full")
    assert full.returncode == 0 and "STATUS completed 24" in full.stdout, full.stderr
    return tmp / "full.st"


def test_sigkill_then_resume_gives_identical_weights(tmp_path, full_run):
    # 64 examples / batch 8 = 8 steps per epoch, 24 steps; checkpoints every 3 steps. Die inside step 11.
    killed = _run_toy(tmp_path, "crash", "--kill-after-loss-calls", "11")
    assert killed.returncode == -9, killed.stderr
    assert latest_checkpoint(tmp_path / "crash" / "checkpoints").name == "checkpoint-9"
    resumed = _run_toy(tmp_path, "crash", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _same_weights(full_run, tmp_path / "crash.st")


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resume_matches(tmp_path, full_run, sig):
    stopped = _run_toy(tmp_path, "int", "--save-every", "0", "--signal", sig, "--signal-at", "5")
    assert stopped.returncode == 0, stopped.stderr
    assert "STATUS interrupted 5" in stopped.stdout and f"interrupted (SIG{sig}) at step 5" in stopped.stdout
    assert latest_checkpoint(tmp_path / "int" / "checkpoints").name == "checkpoint-5"
    resumed = _run_toy(tmp_path, "int", "--save-every", "0", "--resume")
    assert "STATUS completed 24" in resumed.stdout, resumed.stderr
    assert _same_weights(full_run, tmp_path / "int.st")


def test_sigterm_before_the_first_step_still_writes_a_checkpoint_to_resume_from(tmp_path, full_run):
    stopped = _run_toy(tmp_path, "early", "--signal", "TERM", "--signal-at", "setup")
    assert stopped.returncode == 0, stopped.stderr  # before: killed by the signal, nothing to resume
    assert "STATUS interrupted 0" in stopped.stdout and "resume with --resume" in stopped.stdout
    assert latest_checkpoint(tmp_path / "early" / "checkpoints").name == "checkpoint-0"
    resumed = _run_toy(tmp_path, "early", "--resume")
    assert "STATUS completed 24" in resumed.stdout, resumed.stderr
    assert _same_weights(full_run, tmp_path / "early.st")


def test_batchnorm_statistics_survive_a_sigkill_and_resume(tmp_path):
    # running mean/var train without gradients: before they were checkpointed, the resumed run went on
    # from the statistics the model was built with and ended with different ones than the uninterrupted run
    full = _run_toy(tmp_path, "full", "--batchnorm")
    assert "STATUS completed 24" in full.stdout, full.stderr
    killed = _run_toy(tmp_path, "crash", "--batchnorm", "--kill-after-loss-calls", "11")
    assert killed.returncode == -9, killed.stderr
    ckpt = latest_checkpoint(tmp_path / "crash" / "checkpoints")
    stats = load_file(str(ckpt / "running_stats.safetensors"))
    assert sorted(stats) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    assert int(stats["1.num_batches_tracked"]) == 9  # one update per step, 9 steps in
    resumed = _run_toy(tmp_path, "crash", "--batchnorm", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = load_file(str(tmp_path / "crash.st"))
    assert int(final["1.num_batches_tracked"]) == 24
    assert _same_weights(tmp_path / "full.st", tmp_path / "crash.st")  # parameters and statistics, bit for bit


def test_keep_best_restores_the_batchnorm_statistics_of_the_best_evaluation():
    task = toy_task(eval_values=[0.5, 0.9, 0.7, 0.6])  # best at the 2nd evaluation (step 4)
    model = toy_model(batchnorm=True)
    seen = {}
    orig = task.evaluate

    def spy(m):
        seen[len(seen) + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return orig(m)

    task.evaluate = spy
    res = fit(model, task, ToyTrainConfig(eval_every=2, max_steps=8), log=lambda *a: None)
    assert res.best_step == 4 and int(seen[4]["1.num_batches_tracked"]) == 8
    assert int(seen[2]["1.num_batches_tracked"]) == 4
    assert all(torch.equal(v, seen[2][k]) for k, v in model.state_dict().items())


SCORES = "4:0.5,8:0.9,12:0.7,16:0.6,20:0.65,24:0.8,28:0.5,32:0.85"  # best at step 8


def test_keep_best_run_resumed_after_its_best_step_finishes_identically(tmp_path):
    keep = ["--scores", SCORES, "--eval-every", "4"]
    full = _run_toy(tmp_path, "full", *keep)
    assert "STATUS completed 24" in full.stdout, full.stderr
    killed = _run_toy(tmp_path, "crash", *keep, "--kill-after-loss-calls", "14")  # the best (8) is in this process
    assert killed.returncode == -9 and latest_checkpoint(tmp_path / "crash" / "checkpoints").name == "checkpoint-12"
    resumed = _run_toy(tmp_path, "crash", *keep, "--resume")
    assert "STATUS completed 24" in resumed.stdout, resumed.stderr  # before: StopIteration, rc 1
    assert _same_weights(tmp_path / "full.st", tmp_path / "crash.st")
    fit_json = json.loads((tmp_path / "crash" / "fit.json").read_text())
    assert fit_json["best_step"] == 8 and fit_json["final_metrics"] == {"score": 0.9}
    again = _run_toy(tmp_path, "crash", *keep, "--resume")  # resuming a completed run keeps it completed
    assert "STATUS completed 24" in again.stdout, again.stderr
    assert _same_weights(tmp_path / "full.st", tmp_path / "crash.st")
    longer = _run_toy(tmp_path, "crash", *keep, "--resume", "--epochs", "4")  # extend it by an epoch
    assert "STATUS completed 32" in longer.stdout, longer.stderr
    assert _same_weights(tmp_path / "full.st", tmp_path / "crash.st")  # step 8 is still the best
    steps = [json.loads(l)["step"] for l in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in l]
    assert steps == list(range(1, 33))


def test_resuming_an_early_stopped_run_stays_stopped(tmp_path):
    cfg = ToyTrainConfig(eval_every=2, early_stopping_patience=2, max_steps=40)
    first = fit(toy_model(), toy_task(eval_values=[0.5, 0.9, 0.7, 0.6]), cfg, run_dir=tmp_path, log=lambda *a: None)
    assert first.status == "early_stopped" and first.global_step == 8
    model = toy_model()
    again = fit(model, toy_task(eval_values=[0.0]), cfg, run_dir=tmp_path, resume=True, log=lambda *a: None)
    assert again.status == "early_stopped" and again.global_step == 8 and again.final_metrics == {"score": 0.9}


def test_non_finite_evaluation_is_an_error(tmp_path):
    task = toy_task()
    task.evaluate = lambda m: {"mse": 0.5, "eval_loss": float("nan")}
    with pytest.raises(NonFiniteMetricError, match=r"step 8 returned non-finite \{'eval_loss': nan\}"):
        fit(toy_model(), task, ToyTrainConfig(nan_policy="skip"), run_dir=tmp_path, log=lambda *a: None)
    assert not (tmp_path / "fit.json").exists()


def test_divergence_is_flagged_and_warned(tmp_path):
    lines: list[str] = []
    res = fit(toy_model(), toy_task(), ToyTrainConfig(lr=10.0, warmup_ratio=0.0, max_grad_norm=0.0, keep_best=False),
              run_dir=tmp_path, log=lines.append)
    assert res.diverged and res.status == "completed"
    assert any(l.startswith("WARNING: training diverged") for l in lines), lines
    assert json.loads((tmp_path / "fit.json").read_text())["diverged"] is True
    calm = fit(toy_model(), toy_task(), ToyTrainConfig(), log=lambda *a: None)
    assert not calm.diverged


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


def test_train_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state = TrainState(step=7, epoch=1, batch_in_epoch=3, bad_evals=1, best_metric=0.9, best_step=4,
                       history=[{"step": 4, "score": 0.9}, {"step": 6, "score": float("nan")}], train_tokens=56,
                       train_seconds=1.5, skipped_steps=2, first_loss=3.0, high_loss_steps=1,
                       best_weights={"w": torch.ones(2)})
    saved = state.to_checkpoint()
    assert "best_weights" not in saved  # stored as safetensors beside state.pt
    torch.save({"optimizer": {}, **saved}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    back = TrainState.from_checkpoint({**loaded, "best_weights": {"w": torch.ones(2)}})
    assert back.to_checkpoint().keys() == saved.keys() and back.history[0] == {"step": 4, "score": 0.9}
    assert (back.step, back.best_step, back.first_loss, back.skipped_steps) == (7, 4, 3.0, 2)
    assert torch.equal(back.best_weights["w"], torch.ones(2))


def test_fit_trains_in_training_mode_even_if_the_model_arrives_in_eval_mode():
    """A model loaded with from_pretrained is in eval mode; training with it so would silently drop dropout."""
    from tests.engine.toy import ToyTrainConfig, toy_model, toy_task

    model = toy_model(dropout=0.5).eval()
    seen = []
    task = toy_task(hook=lambda k: seen.append(model.training))
    fit(model, task, ToyTrainConfig(max_steps=3, epochs=1.0))
    assert seen and all(seen)
