"""Checkpoints: a manifest (sizes + sha256) inside each; resume falls back from a damaged latest one to
the newest complete one and finishes bit-identically; disk full fails loudly and keeps the previous
checkpoint; dead writers' leftovers are cleaned; metrics.jsonl does not repeat steps after a resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

sys.path.insert(0, str(Path(__file__).parent))
from toy import ToyTrainConfig, toy_model, toy_task  # noqa: E402

from loralab.engine import checkpoint  # noqa: E402
from loralab.engine.checkpoint import (CheckpointWriteError, clean_stale, find_checkpoint,  # noqa: E402
                                       latest_checkpoint, verify_checkpoint)
from loralab.engine.trainer import fit  # noqa: E402


class Crash(Exception):
    pass


def _train(run_dir: Path, resume: bool = False, crash_at: int = 0, log=None) -> dict[str, torch.Tensor]:
    """The toy run (24 steps, checkpoints every 3, keep-best on the epoch-end mse); ``crash_at`` raises
    inside that loss call, as a crash would."""
    def hook(k: int) -> None:
        if k == crash_at:
            raise Crash

    model = toy_model()
    fit(model, toy_task(hook=hook), ToyTrainConfig(save_every=3), run_dir=run_dir, resume=resume,
        log=log or (lambda *_: None))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, torch.Tensor]:
    return _train(tmp_path_factory.mktemp("full") / "run")


def _crashed(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    with pytest.raises(Crash):
        _train(run, crash_at=20)  # dies inside step 20: checkpoints 16 (epoch end) and 18 remain
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-18"]
    return run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "latest deleted": (lambda c: shutil.rmtree(c / "checkpoint-18"), "checkpoint-16"),
    "state.pt truncated": (lambda c: _truncate(c / "checkpoint-18" / "state.pt"), "checkpoint-16"),
    "weights truncated": (lambda c: _truncate(c / "checkpoint-18" / "trainable.safetensors"), "checkpoint-16"),
    "manifest missing": (lambda c: (c / "checkpoint-18" / "manifest.json").unlink(), "checkpoint-16"),
    "pointer garbage": (lambda c: (c / "latest").write_bytes(b'{"step": 1'), "checkpoint-18"),
    "pointer to a deleted dir": (lambda c: (c / "latest").write_text('{"step": 99, "dir": "checkpoint-99"}'),
                                 "checkpoint-18"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_latest_falls_back_and_finishes_bit_identically(tmp_path, full, case):
    run = _crashed(tmp_path)
    damage, expected = DAMAGE[case]
    damage(run / "checkpoints")
    lines: list[str] = []
    resumed = _train(run, resume=True, log=lines.append)
    assert any(f"resumed from {run / 'checkpoints' / expected}" in line for line in lines), lines
    if expected == "checkpoint-16":  # the rejection and its reason are in the log
        assert any("checkpoint-18" in line and "resume:" in line for line in lines), lines
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 25))  # every step once: the crashed run's steps 17-19 were dropped


def test_manifest_records_every_file_and_verify_names_the_damage(tmp_path):
    run = _crashed(tmp_path)
    ckpt = run / "checkpoints" / "checkpoint-18"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["files"]) == {"trainable.safetensors", "state.pt", "best.safetensors"}
    assert verify_checkpoint(ckpt) is None
    data = bytearray((ckpt / "state.pt").read_bytes())
    data[-30] ^= 0xFF  # same size, one flipped byte
    (ckpt / "state.pt").write_bytes(bytes(data))
    assert "state.pt checksum" in verify_checkpoint(ckpt)
    data[-30] ^= 0xFF
    (ckpt / "state.pt").write_bytes(bytes(data))
    _truncate(ckpt / "trainable.safetensors")
    assert "trainable.safetensors is" in verify_checkpoint(ckpt)
    path, notes = find_checkpoint(run / "checkpoints")
    assert path.name == "checkpoint-16" and any("rejected checkpoint-18" in n for n in notes)
    with pytest.raises(ValueError, match="damaged"):  # an explicitly named checkpoint is verified too
        fit(toy_model(), toy_task(), ToyTrainConfig(save_every=3), run_dir=run, resume=ckpt, log=lambda *_: None)


def test_all_damaged_is_an_error_and_no_checkpoint_starts_over(tmp_path, full):
    run = _crashed(tmp_path)
    for c in (run / "checkpoints").glob("checkpoint-*"):
        _truncate(c / "state.pt")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*rejected checkpoint-18"):
        _train(run, resume=True)
    fresh = tmp_path / "never-checkpointed"  # stopped before its first checkpoint: resume = start over
    fresh.mkdir()
    assert all(torch.equal(full[n], w) for n, w in _train(fresh, resume=True).items())


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_disk_full_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer):
    if writer == "torch.save":
        real_save = checkpoint.torch.save

        def save(obj, path, *a, **kw):
            if "checkpoint-6" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, path, *a, **kw)

        monkeypatch.setattr(checkpoint.torch, "save", save)
    else:  # safetensors raises its own error type for I/O failures
        real_save_file = checkpoint.save_file

        def save_file(tensors, path, *a, **kw):
            if "checkpoint-6" in str(path):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save_file(tensors, path, *a, **kw)

        monkeypatch.setattr(checkpoint, "save_file", save_file)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-6 in .*run.*No space left.*checkpoint-3.* intact") as e:
        _train(run)
    assert e.value.errno == errno.ENOSPC and str(run) in str(e.value)
    root = run / "checkpoints"
    assert latest_checkpoint(root).name == "checkpoint-3" and verify_checkpoint(root / "checkpoint-3") is None
    assert json.loads((root / "latest").read_text())["dir"] == "checkpoint-3"
    assert not list(root.glob(".tmp-*"))


def test_leftovers_of_dead_writers_are_cleaned_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live_pid = os.getppid()  # the shell or runner that started pytest: alive
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / f".tmp-checkpoint-5-{dead_pid}").mkdir()
    (root / f".old-checkpoint-4-{dead_pid}").mkdir()
    (root / f".latest.tmp-{dead_pid}").write_text("x")
    (root / f".tmp-checkpoint-7-{live_pid}").mkdir()
    assert len(clean_stale(root)) == 3
    assert [p.name for p in root.iterdir()] == [f".tmp-checkpoint-7-{live_pid}"]
    (root / f".tmp-checkpoint-5-{dead_pid}").mkdir()
    fit(toy_model(), toy_task(), ToyTrainConfig(max_steps=3, save_every=3), run_dir=tmp_path / "run",
        log=lambda *_: None)  # a save cleans too
    assert not (root / f".tmp-checkpoint-5-{dead_pid}").exists() and (root / f".tmp-checkpoint-7-{live_pid}").exists()


def test_running_statistics_of_another_model_are_refused_before_anything_is_loaded(tmp_path):
    from loralab.engine.checkpoint import load_checkpoint, save_checkpoint

    source = toy_model(seed=0, batchnorm=True)
    source[1].running_mean.fill_(3.0)
    path = save_checkpoint(tmp_path, 1, source, {})
    target = toy_model(seed=1, batchnorm=True)
    target[1].register_buffer("running_mean", torch.zeros(15))  # another normalisation layer's size
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"1\.running_mean has shape \(16,\), the model expects \(15,\)"):
        load_checkpoint(path, target)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # the weights were not half-loaded
    same = toy_model(seed=1, batchnorm=True)
    load_checkpoint(path, same)
    assert torch.equal(same[1].running_mean, torch.full((16,), 3.0)) and torch.equal(same[0].weight, source[0].weight)
