"""Helpers: write PEFT-format adapter and base-model directories from given tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def write_adapter(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], **config) -> Path:
    """factors: {module: (A (r x in), B (out x r))}; config: adapter_config.json fields (r, lora_alpha, ...)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.clone().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.clone().contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 8}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def write_base(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}")
    return path


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    """n x k with orthonormal columns (float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


@pytest.fixture
def adapter_writer():
    return write_adapter


@pytest.fixture
def base_writer():
    return write_base
