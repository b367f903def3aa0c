"""Checkpoints that resume exactly and are never half-written.

A checkpoint is a directory ``checkpoint-<step>/`` holding

- ``trainable.safetensors``  every parameter with requires_grad (adapter, heads, biases),
- ``running_stats.safetensors``  the running mean/var/count of every norm layer that tracks them
                             (BatchNorm; absent when the model has none): training updates them without
                             gradients, and evaluating resumed weights with stale statistics is wrong,
- ``state.pt``               optimizer, scheduler, RNG states and the data position (tensors, dicts,
                             lists and numbers only, read back with ``torch.load(weights_only=True)``,
                             so loading never unpickles arbitrary objects), and the TrainState,
- ``best.safetensors``       the kept-best weights and running statistics (keep_best runs, once a best
                             evaluation exists),
- ``manifest.json``          size and sha256 of each file above, written last.

Writing goes to ``.tmp-checkpoint-<step>-<pid>/`` first, each file fsynced, the manifest last, then the
directory is renamed into place and the ``latest`` pointer file is replaced atomically. A crash at any
moment leaves the previous good checkpoint intact. Reading trusts no pointer: ``find_checkpoint`` takes
the newest checkpoint whose files match its manifest and says why newer ones were rejected (deleted,
truncated, half-written), so a damaged latest checkpoint falls back to the one before it. Leftovers of
dead writers (``.tmp-*``) are removed at the next save or resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest"
MANIFEST = "manifest.json"
_CKPT_NAME = re.compile(r"checkpoint-(\d+)")
_TMP_NAME = re.compile(r"\.(?:tmp-checkpoint-\d+|old-checkpoint-\d+|latest\.tmp)-(\d+)")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains, by its name in ``model`` (detached, contiguous, on CPU)."""
    return _for_file({n: p for n, p in model.named_parameters() if p.requires_grad})


def _for_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, as safetensors writes them."""
    return {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}


def running_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers training changes without gradients, by name: ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` of every module with ``track_running_stats`` (BatchNorm, InstanceNorm)."""
    stats = {}
    for prefix, module in model.named_modules():
        if getattr(module, "track_running_stats", False):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if isinstance(buf := getattr(module, name, None), torch.Tensor):
                    stats[f"{prefix}.{name}" if prefix else name] = buf
    return stats


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` dir (None for any other name)."""
    m = _CKPT_NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(root: Path) -> list[Path]:
    """Remove the temporary files and dirs (``.tmp-checkpoint-<step>-<pid>``, ``.old-…``,
    ``.latest.tmp-<pid>``) left by writers that died; a live writer's are kept."""
    removed = []
    for p in Path(root).glob(".*"):
        m = _TMP_NAME.fullmatch(p.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def save_checkpoint(root: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2,
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``root/checkpoint-<step>`` atomically, point ``root/latest`` at it, prune old ones.

    ``best`` (the kept-best trainable weights) is stored beside the current ones so keep-best survives a
    resume. A failed write (e.g. disk full) raises ``CheckpointWriteError`` and leaves the previous
    checkpoints and pointer as they were.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if stats := running_statistics(model):
            save_file(_for_file(stats), str(tmp / "running_stats.safetensors"))
        torch.save(state, tmp / "state.pt")
        if best is not None:
            save_file(_for_file(best), str(tmp / "best.safetensors"))
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        # the manifest is written last: a checkpoint is complete exactly when its manifest matches
        _write_atomic(tmp / MANIFEST, json.dumps({"format": 1, "step": step, "files": files}, indent=1).encode())
        old = root / f".old-checkpoint-{step}-{os.getpid()}"
        if final.exists():  # same step written again (e.g. a resumed run rewriting a damaged one)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        _write_atomic(root / LATEST, json.dumps({"step": step, "dir": final.name}).encode())
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors (disk full) as its own type
        shutil.rmtree(tmp, ignore_errors=True)
        code = getattr(e, "errno", None) or next(map(int, re.findall(r"os error (\d+)", str(e))), None)
        previous = latest_checkpoint(root)
        raise CheckpointWriteError(
            code, f"could not write checkpoint {final.name} in {root}: {getattr(e, 'strerror', None) or e}. "
            f"The previous checkpoint ({previous or 'none'}) is intact; free disk space and resume with --resume"
        ) from e
    ckpts = sorted((p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)
    for old_ckpt in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old_ckpt, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` holds every file its manifest lists, with the recorded size and sha256;
    otherwise why not (for the log)."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (written incompletely, or by an older loralab)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for name, want in files.items():
        f = path / name
        try:
            if f.stat().st_size != want["bytes"]:
                return f"{name} is {f.stat().st_size} bytes, the manifest says {want['bytes']}"
            if _sha256(f) != want["sha256"]:
                return f"{name} checksum differs from the manifest"
        except FileNotFoundError:
            return f"{name} missing"
        except OSError as e:
            return f"{name} unreadable ({e.strerror or e})"
    return None


def find_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete (verified) checkpoint under ``root``, and why newer ones were passed over.

    Every ``checkpoint-<step>`` dir is a candidate, newest first; the ``latest`` pointer is only
    reported on when it disagrees (it is written after the dir is in place, so a kill between the two
    leaves it one checkpoint behind, and it can itself be damaged).
    """
    root = Path(root)
    notes: list[str] = []
    candidates = sorted((p for p in root.glob("checkpoint-*") if checkpoint_step(p) is not None), key=checkpoint_step,
                        reverse=True) if root.is_dir() else []
    pointed = None
    if (root / LATEST).exists():
        try:
            pointed = root / json.loads((root / LATEST).read_text())["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(f"{root / LATEST} is unreadable or garbage; ignored")
    chosen = None
    for path in candidates:
        reason = verify_checkpoint(path)
        if reason is None:
            chosen = path
            break
        notes.append(f"rejected {path.name}: {reason}")
    if pointed is not None and pointed != chosen and not pointed.exists():
        notes.append(f"{root / LATEST} names {pointed.name}, which is missing")
    return chosen, notes


def remove_checkpoints_after(root: Path, step: int) -> list[Path]:
    """Delete the checkpoints newer than ``step`` (a resume that fell back past them rewrites them)."""
    removed = [p for p in Path(root).glob("checkpoint-*") if (checkpoint_step(p) or -1) > step]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (see ``find_checkpoint``), or None."""
    return find_checkpoint(root)[0]


def _check_match(path: Path, what: str, targets: dict[str, torch.Tensor], saved: dict[str, torch.Tensor],
                 config_hint: str) -> None:
    """The checkpoint's tensors have exactly the model's names and shapes, or a ValueError naming them."""
    missing, unexpected = targets.keys() - saved.keys(), saved.keys() - targets.keys()
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model's {what}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} — was it written by a run with another config ({config_hint})?")
    for name, tensor in saved.items():
        if targets[name].shape != tensor.shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(targets[name].shape)}")


def load_checkpoint(path: Path, model: nn.Module, verify: bool = True) -> dict[str, Any]:
    """Load trainable weights into ``model`` (names and shapes must match exactly) and return the state
    (with ``best_weights`` when the checkpoint has them). ``verify`` checks the manifest first."""
    path = Path(path)
    weights_file = path / "trainable.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(f"{path} is not a loralab checkpoint: {weights_file.name} is missing")
    if verify and (reason := verify_checkpoint(path)) is not None:
        raise ValueError(f"checkpoint {path} is damaged: {reason}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [(params, load_file(str(weights_file)))]
    _check_match(path, "trainable parameters", *groups[0], "method, target modules, rank")
    stats, stats_file = running_statistics(model), path / "running_stats.safetensors"
    if stats_file.exists():
        groups.append((stats, load_file(str(stats_file))))
        _check_match(path, "running statistics", *groups[1], "model, normalisation layers")
    with torch.no_grad():  # everything checked first: a mismatch leaves the model as it was
        for targets, saved in groups:
            for name, tensor in saved.items():
                targets[name].copy_(tensor)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if stats and not stats_file.exists():  # written before running statistics were checkpointed
        state["running_stats_missing"] = True
    if (path / "best.safetensors").exists():
        state["best_weights"] = load_file(str(path / "best.safetensors"))
    return state
