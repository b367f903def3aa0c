"""A tiny synthetic regression task for engine tests (no transformers): importable and runnable.

As a script it trains and writes the final trainable weights, optionally SIGKILLing itself inside a
given loss call (the resume tests) or sending itself SIGINT / SIGTERM there or during setup.
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


def toy_model(seed: int = 0, dropout: float = 0.1, batchnorm: bool = False) -> nn.Module:
    """``batchnorm``: a BatchNorm1d after the first layer, whose running statistics training updates."""
    torch.manual_seed(seed)
    norm = [nn.BatchNorm1d(16, momentum=0.3)] if batchnorm else []
    return nn.Sequential(nn.Linear(8, 16), *norm, nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def toy_task(n: int = 64, seed: int = 1, hook=None, eval_values: list[float] | None = None,
             score_at=None) -> TaskSpec:
    """``eval_values``: the scores of the 1st, 2nd, ... evaluation of this process; ``score_at``: a
    function returning the score for the current step, the same in a resumed process."""
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
        if score_at is not None:
            return {"score": score_at()}
        if eval_values is not None:
            return {"score": eval_values[min(calls["eval"], len(eval_values)) - 1]}
        with torch.no_grad():
            return {"mse": float(nn.functional.mse_loss(model(x), y))}

    spec = TaskSpec(train_dataset=data, collate=collate, loss=loss, evaluate=evaluate,
                    metric="score" if eval_values or score_at else "mse",
                    greater_is_better=bool(eval_values or score_at), tokens=lambda b: b["x"].shape[0])
    spec.calls = calls
    return spec


class _SignalOnLen(list):
    """A training set whose first ``len()`` (in fit's setup, before any step) sends a signal."""

    def __init__(self, items, sig) -> None:
        super().__init__(items)
        self.sig = sig

    def __len__(self) -> int:
        if self.sig:
            sig, self.sig = self.sig, None
            os.kill(os.getpid(), sig)
        return super().__len__()


def step_scores(optimizer, scores: dict[int, float]):
    """A ``score_at`` for toy_task: the score of the optimizer's step count (0.0 for unlisted steps)."""
    def score_at() -> float:
        state = next(iter(optimizer.state.values()), None)
        return scores.get(int(state["step"]) if state else 0, 0.0)

    return score_at


if __name__ == "__main__":
    from safetensors.torch import save_file

    from loralab.engine import distributed
    from loralab.engine.loop_utils import build_optimizer_for
    from loralab.engine.trainer import fit

    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--kill-after-loss-calls", type=int, default=0)
    ap.add_argument("--signal", choices=["INT", "TERM"], default="INT")
    ap.add_argument("--signal-at", default="", help="a loss call number, or 'setup'")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--scores", default="", help="STEP:SCORE,...: keep-best on these scores")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--batchnorm", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    distributed.init()
    torch.set_num_threads(1)
    sig = getattr(signal, f"SIG{args.signal}")

    def hook(k):
        if args.kill_after_loss_calls and k == args.kill_after_loss_calls:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.signal_at.isdigit() and k == int(args.signal_at):
            os.kill(os.getpid(), sig)

    model = toy_model(dropout=args.dropout, batchnorm=args.batchnorm)
    cfg = ToyTrainConfig(save_every=args.save_every, eval_every=args.eval_every, grad_accum=args.grad_accum,
                         epochs=args.epochs)
    optimizer = build_optimizer_for(model, cfg)
    scores = {int(k): float(v) for k, v in (kv.split(":") for kv in args.scores.split(",") if kv)}
    task = toy_task(hook=hook, score_at=step_scores(optimizer, scores) if scores else None)
    task.train_dataset = _SignalOnLen(task.train_dataset, sig if args.signal_at == "setup" else None)
    result = fit(model, task, cfg, run_dir=args.run_dir, resume=args.resume, optimizer=optimizer)
    if distributed.is_main():
        save_file({n: p.detach().contiguous() for n, p in model.state_dict().items()}, args.out)  # buffers too
        print("STATUS", result.status, result.global_step)
    distributed.shutdown()
