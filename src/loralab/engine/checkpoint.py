"""Checkpoints that resume exactly and are never half-written.

A checkpoint is a directory ``checkpoint-<step>/`` holding

- ``trainable.safetensors``  every parameter with requires_grad (adapter, heads, biases),
- ``state.pt``               optimizer, scheduler, RNG states and the data position (tensors, dicts,
                             lists and numbers only, read back with ``torch.load(weights_only=True)``,
                             so loading never unpickles arbitrary objects).

Writing goes to ``.tmp-checkpoint-<step>-<pid>/`` first, each file fsynced, then the directory is
renamed into place and the ``latest`` pointer file is replaced atomically. A crash at any moment leaves
the previous good checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains, by its name in ``model`` (detached, contiguous, on CPU)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(root: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2,
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``root/checkpoint-<step>`` atomically, point ``root/latest`` at it, prune old ones.

    ``best`` (the kept-best trainable weights) is stored beside the current ones so keep-best survives a resume.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(state, tmp / "state.pt")
    if best is not None:
        save_file({k: v.to("cpu").contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # same step written again (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, json.dumps({"step": step, "dir": final.name}).encode())
    ckpts = sorted((p for p in root.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / json.loads(pointer.read_text())["dir"]
    return path if path.exists() else None


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load trainable weights into ``model`` (names and shapes must match exactly) and return the state."""
    path = Path(path)
    weights_file = path / "trainable.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(f"{path} is not a loralab checkpoint: {weights_file.name} is missing")
    saved = load_file(str(weights_file))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = trainable - saved.keys(), saved.keys() - trainable
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model's trainable parameters: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} — was it written by a "
            "run with another config (method, target modules, rank)?"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if (path / "best.safetensors").exists():
        state["best_weights"] = load_file(str(path / "best.safetensors"))
    return state
