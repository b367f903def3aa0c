"""A complete loralab experiment in one module: linear regression y = X w + 0.5 + noise.

Importing it registers the experiment "toy" (tests copy this file elsewhere and name it in
$LORALAB_EXPERIMENTS to show that a plugin needs no edit of loralab itself). It uses only the public API:
the experiment protocol, a DataConfig subclass, TaskSpec, Result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from loralab.engine.experiment import Baseline, Built, Result, register_experiment
from loralab.engine.schema import DataConfig
from loralab.engine.task import TaskSpec


@dataclass
class ToyData(DataConfig):
    """Synthetic regression data."""

    n: int = 256
    """Training examples."""
    noise: float = 0.1
    """Standard deviation of the label noise."""

    def check(self) -> list[tuple[str, str]]:
        return super().check() + ([] if self.n >= 8 else [("n", f"must be >= 8, got {self.n}")])


def make_data(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5 + noise * torch.randn(n, generator=g)
    return x, y


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        nn.init.zeros_(self.linear.weight)  # starts at predicting 0: worse than the constant baseline
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


class ToyExperiment:
    name: ClassVar[str] = "toy"
    data_config: ClassVar[type] = ToyData
    sections: ClassVar[tuple[str, ...]] = ()
    shared_baseline: ClassVar[bool] = True  # the constant predictor: a function of the data and seed alone
    sweeps: ClassVar[dict[str, dict]] = {  # a named sweep with "paper" numbers to sit beside
        "toy-lr": {"preset": "toy-fit", "grid": {"train.lr": [0.2, 0.0001]}, "fixed": {"data.noise": 0.2},
                   "seeds": [0], "reference": {"label": "a made-up paper", "key": "train.lr",
                                               "metrics": {"mse": 10.0}, "rows": {"0.2": {"mse": 0.5}}}},
    }
    presets: ClassVar[dict[str, dict]] = {
        "toy-fit": {"_doc": "linear regression in a second", "data.n": 256, "train.lr": 0.2,
                    "train.batch_size": 16, "train.max_steps": 64, "train.schedule": "constant", "lora.method": "full",
                    "train.quiet": True},
    }

    def build(self, cfg: Any) -> Built:
        x, y = make_data(cfg.data.n, cfg.data.noise, cfg.data.seed)
        hx, hy = make_data(64, cfg.data.noise, cfg.data.seed + 1)
        torch.manual_seed(cfg.train.seed)
        model = Regression()
        data = [{"x": x[i], "y": y[i], "input_ids": [0]} for i in range(len(y))]

        def collate(items: list[dict]) -> dict[str, torch.Tensor]:
            return {"x": torch.stack([e["x"] for e in items]), "y": torch.stack([e["y"] for e in items])}

        task = TaskSpec(train_dataset=data, collate=collate,
                        loss=lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean(),
                        evaluate=lambda m: {"mse": mse(m, hx, hy)}, metric="mse", greater_is_better=False,
                        tokens=lambda b: b["x"].shape[0])
        return Built(model, task, {"held": (hx, hy), "train_mean": float(y.mean())})

    def baseline(self, built: Built) -> Baseline:
        hx, hy = built.state["held"]
        constant = float(((built.state["train_mean"] - hy) ** 2).mean())
        return Baseline(score=constant, kind="constant predictor (train mean)", metrics={"mse": constant})

    def report(self, built: Built, fit: Any, run_dir: Any) -> Result:
        hx, hy = built.state["held"]
        value = mse(built.model, hx, hy)
        w = built.model.linear.weight.detach().flatten().tolist() + built.model.linear.bias.detach().tolist()
        return Result(experiment="toy", main_metric="mse", score=value, metrics={"mse": value},
                      greater_is_better=False, baseline=built.baseline, margin=0.05 * built.baseline.score,
                      trainable_params=5, total_params=5,
                      tokens_per_second=getattr(fit, "tokens_per_second", 0.0) if fit is not None else 0.0,
                      details={"weights": w, "steps": getattr(fit, "global_step", None)})


EXPERIMENT = register_experiment(ToyExperiment())
