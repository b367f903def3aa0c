"""A tiny synthetic regression task for engine tests (no transformers): importable and runnable.

As a script it trains and writes the final trainable weights, optionally SIGKILLing itself after a given
step (the resume test) or sending itself SIGINT (the Ctrl-C test).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from loralab.engine.config import TrainConfig  # noqa: E402
from loralab.engine.task import TaskSpec  # noqa: E402


def ToyTrainConfig(**overrides) -> TrainConfig:
    """The real TrainConfig with settings that make the toy task train visibly in a few steps."""
    defaults = dict(lr=1e-2, weight_decay=0.01, epochs=3.0, batch_size=8, warmup_ratio=0.1, max_grad_norm=1.0,
                    quiet=True)
    return TrainConfig(**{**defaults, **overrides})


def toy_model(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def toy_task(n: int = 64, seed: int = 1, hook=None, eval_values: list[float] | None = None) -> TaskSpec:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    data = [{"x": x[i], "y": y[i], "input_ids": list(range(1 + i % 5))} for i in range(n)]
    calls = {"loss": 0, "eval": 0}

    def collate(items):
        return {"x": torch.stack([e["x"] for e in items]), "y": torch.stack([e["y"] for e in items])}

    def loss(model, batch):
        calls["loss"] += 1
        if hook:
            hook(calls["loss"])
        return nn.functional.mse_loss(model(batch["x"]), batch["y"])

    def evaluate(model):
        calls["eval"] += 1
        if eval_values is not None:
            return {"score": eval_values[min(calls["eval"], len(eval_values)) - 1]}
        with torch.no_grad():
            return {"mse": float(nn.functional.mse_loss(model(x), y))}

    spec = TaskSpec(train_dataset=data, collate=collate, loss=loss, evaluate=evaluate,
                    metric="score" if eval_values is not None else "mse",
                    greater_is_better=eval_values is not None, tokens=lambda b: b["x"].shape[0])
    spec.calls = calls
    return spec


if __name__ == "__main__":
    from safetensors.torch import save_file

    from loralab.engine import distributed
    from loralab.engine.trainer import fit

    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--kill-after-loss-calls", type=int, default=0)
    ap.add_argument("--sigint-after-loss-calls", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    distributed.init()
    torch.set_num_threads(1)

    def hook(k):
        if args.kill_after_loss_calls and k == args.kill_after_loss_calls:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.sigint_after_loss_calls and k == args.sigint_after_loss_calls:
            os.kill(os.getpid(), signal.SIGINT)

    model = toy_model(dropout=args.dropout)
    cfg = ToyTrainConfig(save_every=args.save_every, grad_accum=args.grad_accum)
    result = fit(model, toy_task(hook=hook), cfg, run_dir=args.run_dir, resume=args.resume)
    if distributed.is_main():
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, args.out)
        print("STATUS", result.status, result.global_step)
    distributed.shutdown()
