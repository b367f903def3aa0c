"""Data parallelism through torchrun: the same config runs on one process or many.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; ``init()`` then joins the process group (gloo on CPU,
nccl on GPU). Each global batch is split across ranks (``shard``), DDP averages gradients, and only
rank 0 writes files or prints. With one process every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


def init() -> bool:
    """Join the process group when launched by torchrun; returns True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(global_batch: list[int]) -> list[int]:
    """This rank's contiguous share of a global batch (the batch size must divide evenly)."""
    if not active():
        return global_batch
    k = len(global_batch) // world_size()
    if k * world_size() != len(global_batch):  # a short last batch: give every rank an equal, smaller share
        global_batch = global_batch[: k * world_size()] or global_batch[:1] * world_size()
        k = max(1, len(global_batch) // world_size())
    return global_batch[rank() * k:(rank() + 1) * k]


def wrap(model: nn.Module) -> nn.Module:
    if not active():
        return model
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync_unless(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def _reduce(value: float, op) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t.item())


def mean_scalar(value: float) -> float:
    return _reduce(value, dist.ReduceOp.SUM) / world_size() if active() else value


def sum_scalar(value: float) -> float:
    return _reduce(value, dist.ReduceOp.SUM)


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly (every rank waits for the others first); a rank exiting with
    gloo's threads still running aborts with "terminate called without an active exception"."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
