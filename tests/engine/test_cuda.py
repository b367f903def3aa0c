"""The training loop on a CUDA device: a run resumed from a checkpoint ends bit-identical to the
uninterrupted one (model, optimizer, schedule and the CUDA RNG that drives dropout are all restored),
and the paged (offloaded) optimizer trains the same weights. Skipped without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy import ToyTrainConfig, toy_model, toy_task  # noqa: E402

from loralab.engine.trainer import fit  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _Crash(Exception):
    pass


def _crash_at(call: int):
    def hook(k: int) -> None:
        if k == call:
            raise _Crash

    return hook


def _task(hook=None):
    task = toy_task(hook=hook)
    task.evaluate, task.metric = None, None  # the toy evaluation reads CPU tensors
    return task


def _train(run_dir: Path, resume=False, hook=None, **cfg) -> dict[str, torch.Tensor]:
    model = toy_model(dropout=0.3).cuda()
    result = fit(model, _task(hook), ToyTrainConfig(save_every=3, **cfg), run_dir=run_dir, resume=resume,
                 log=lambda *_: None)
    assert result.global_step == 24
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def test_resume_on_cuda_is_bit_identical(tmp_path):
    full = _train(tmp_path / "full")
    with pytest.raises(_Crash):  # dies inside step 11; checkpoints every 3 steps
        _train(tmp_path / "crash", hook=_crash_at(11))
    assert (tmp_path / "crash" / "checkpoints" / "checkpoint-9").is_dir()
    resumed = _train(tmp_path / "crash", resume=True)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    other_seed = _train(tmp_path / "seed2", seed=2)
    assert any(not torch.equal(full[n], other_seed[n]) for n in full)  # the check can fail


@pytest.mark.parametrize("optimizer", ["paged_adamw", "paged_adamw8bit"])
def test_paged_optimizer_on_cuda_trains_like_the_plain_one(tmp_path, optimizer):
    plain = _train(tmp_path / "plain", optimizer=optimizer.removeprefix("paged_"))
    paged = _train(tmp_path / "paged", optimizer=optimizer)
    for name in plain:
        assert torch.equal(plain[name], paged[name]), name
