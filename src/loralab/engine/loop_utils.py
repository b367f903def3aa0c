"""The training loop's helpers: seeding, the optimizer with its no-decay group, the data order, the
stop signal (Ctrl-C / SIGTERM) and copying trainable weights."""

from __future__ import annotations

import math
import random
import signal
from typing import Any

import numpy as np
import torch
from torch import nn

from loralab.engine import distributed as ddp
from loralab.engine.checkpoint import running_statistics


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


def epoch_order(n: int, seed: int, epoch: int, batch_size: int, lengths: list[int] | None) -> list[list[int]]:
    """Global batches of example indices for one epoch, a pure function of its arguments.

    With ``lengths``, examples are sorted by length inside mega-batches of 50 batches and the batches
    are shuffled, so each batch holds similar lengths (little padding) while the order stays random.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        mega = batch_size * 50
        perm = [i for s in range(0, n, mega) for i in sorted(perm[s:s + mega], key=lambda i: -lengths[i])]
    batches = [perm[s:s + batch_size] for s in range(0, n, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def micro_batches(global_batch: list[int], grad_accum: int) -> list[list[int]]:
    k = math.ceil(len(global_batch) / grad_accum)
    return [global_batch[s:s + k] for s in range(0, len(global_batch), k)]


class StopFlag:
    """The first Ctrl-C or SIGTERM asks the loop to checkpoint and stop at the next step boundary; a
    second one aborts at once (KeyboardInterrupt). Outside the main thread signals stay as they are."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without a checkpoint")
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every trainable parameter and running statistic (BatchNorm's: they belong to the
    weights they were computed with), the kept-best state; off the GPU on purpose."""
    params = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    return {**params, **{n: b.detach().to("cpu", copy=True) for n, b in running_statistics(model).items()}}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = {**dict(model.named_parameters()), **running_statistics(model)}
    with torch.no_grad():
        for k, v in state.items():
            tensors[k].copy_(v)


def evaluate_model(model: nn.Module, task: Any) -> dict[str, float]:
    """``task.evaluate`` in eval mode without gradients (the unwrapped model); {} without one."""
    if task.evaluate is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in task.evaluate(ddp.unwrap(model)).items()}
    finally:
        model.train(was_training)
