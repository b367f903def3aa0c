"""The end of every run: the adapter saved beside the results, and the ``Result`` in the common schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from loralab.core.inject import count_parameters, lora_modules
from loralab.engine.experiment import Baseline, Built, Result


def save_trained(model: nn.Module, run_dir: str | Path | None) -> str | None:
    """Save what trained to ``<run_dir>/adapter``; its path, or None when there is no run dir or nothing
    to save beside the base model (full fine-tuning and BitFit save no adapter).

    LoRA: the adapter in PEFT's format, with its modules_to_save. A method applied by ``core.methods``
    (adapter_h/l/p, prefix_layer, prefix_embed, ft_top2): ``save_method``'s adapter_config.json (the
    method and its settings, the head included) + adapter_model.safetensors (its tensors and the head's)."""
    from loralab.core import methods

    if run_dir is None:
        return None
    state = getattr(model, methods.STATE, None)
    if state is not None and state["method"] not in ("lora", "full"):
        return str(methods.save_method(model, Path(run_dir) / "adapter"))
    if not any(True for _ in lora_modules(model)):
        return None
    from loralab.core.adapter_io import save_adapter

    return str(save_adapter(model, Path(run_dir) / "adapter", adapter_name="default"))


def make_result(experiment: str, built: Built, fit: Any, main_metric: str, metrics: dict[str, float],
                greater_is_better: bool = True, margin: float = 0.0, details: dict[str, Any] | None = None) -> Result:
    """A ``Result`` of ``metrics[main_metric]`` against ``built.baseline`` with the model's parameter counts
    and the fit's throughput (the runner fills in the wall time)."""
    if main_metric not in metrics:
        raise KeyError(f"{experiment}: main metric {main_metric!r} not among the evaluated {sorted(metrics)}")
    trainable, total = count_parameters(built.model)
    fit_dict = fit.to_dict() if hasattr(fit, "to_dict") else fit
    tps = float((fit_dict or {}).get("tokens_per_second") or 0.0)
    return Result(experiment=experiment, main_metric=main_metric, score=float(metrics[main_metric]),
                  metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, greater_is_better=greater_is_better,
                  baseline=built.baseline, margin=margin, trainable_params=trainable, total_params=total,
                  tokens_per_second=tps, details={**(details or {}), "fit": fit_dict})


__all__ = ["Baseline", "make_result", "save_trained"]

