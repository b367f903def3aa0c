"""The training loop's helpers: seeding, the optimizer with its no-decay group, progress and metric logs."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def set_seed(seed: int) -> None:
    """Seed every generator the loop uses; on CPU this makes runs bit-for-bit repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation weights (all 1-D parameters) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    if not decay and not plain:
        raise ValueError("the model has no trainable parameters: check lora.target_modules / lora.method")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer_for(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    name = getattr(cfg, "optimizer", "adamw")
    betas = tuple(getattr(cfg, "betas", (0.9, 0.999)))
    eps = getattr(cfg, "eps", 1e-8)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=eps)
    from loralab.core.optim import build_optimizer  # 8-bit and paged variants

    return build_optimizer(model, name, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, eps=eps)


class ProgressLogger:
    """A tqdm bar (loss, lr, tokens/s, ETA) or, in quiet mode, a log line every ``log_every`` steps;
    every step is appended to ``metrics.jsonl``; optionally mirrored to TensorBoard."""

    def __init__(self, total: int, run_dir: Path | None, quiet: bool = False, tensorboard: bool = False,
                 log: Any = print, initial: int = 0, log_every: int = 10) -> None:
        self.total, self.quiet, self.log, self.log_every = total, quiet, log, log_every
        self.metrics_file = open(Path(run_dir) / "metrics.jsonl", "a") if run_dir else None
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.tb = None
        if tensorboard and run_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard=true needs TensorBoard: pip install tensorboard") from e
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _write(self, record: dict[str, Any]) -> None:
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.tb:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def step(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        tps = tokens / seconds if seconds > 0 else 0.0
        self._write({"step": step, "time": time.time(), "train/loss": loss, "train/lr": lr,
                     "train/tokens_per_s": tps})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.update(1)
        elif self.quiet and self.log_every and step % self.log_every == 0 and os.environ.get("RANK", "0") == "0":
            self.log(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} tok/s {tps:,.0f}")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": step, "time": time.time(), **metrics})
        text = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.write(f"step {step}: {text}")
        elif os.environ.get("RANK", "0") == "0":
            self.log(f"step {step}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file:
            self.metrics_file.close()
        if self.tb:
            self.tb.close()
