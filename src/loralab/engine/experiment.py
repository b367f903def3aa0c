"""The experiment interface: what a plugin (GLUE, E2E, SQuAD, vision, ...) hands the engine.

An experiment is one object with

    name            "glue"; the value of the config's ``experiment`` key
    data_config     its own typed data section (a ``Section`` dataclass): ``data.*`` keys it reads
    sections        the other optional sections it reads (e.g. ("generate",)); a key set in a section
                    it does not read is an error at load time
    presets         {name: overrides}: ``loralab train --preset NAME``
    sweeps          (optional) {name: {"preset", "grid", "fixed", "seeds", "reference"}}: named sweeps,
                    ``loralab sweep --sweep NAME`` (``engine.sweep``), with the paper's numbers beside them
    build(cfg)              -> Built      model, the training task, and what report() needs
    baseline(built)         -> Baseline   the un-adapted model's (or the majority class's) score,
                                          measured before training on the same evaluation set
    report(built, fit, run_dir) -> Result the final evaluation, in the one result schema
    shared_baseline (optional, default False) True when baseline(built) depends only on the model, data and
                    generate sections and the seed: a sweep then measures it once for all its methods/ranks

and registers itself with ``register_experiment`` when its module is imported. The engine finds
experiment modules through the ``loralab.experiments`` entry-point group and the ``LORALAB_EXPERIMENTS``
environment variable (comma-separated module names); it knows none by name.

Every run's ``results.json`` has the same top level (``Result.to_dict``): ``experiment``,
``main_metric``, ``greater_is_better``, ``score``, ``baseline`` ({"score", "kind"}), ``learned``,
``metrics``, ``params`` ({"trainable", "total"}), ``wall_seconds``, ``tokens_per_second`` and the
experiment's own ``details``. ``learned`` is false unless the score beats the baseline by more than
``margin`` in the metric's good direction: a row at the baseline is a failed run, never agreement.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from loralab.engine.typed_config import ConfigError

ENTRY_POINT_GROUP = "loralab.experiments"
PLUGIN_ENV = "LORALAB_EXPERIMENTS"


@dataclass
class Baseline:
    """The score an un-adapted model (or a constant predictor) gets on the evaluation set."""

    score: float
    kind: str
    """What produced it: "majority class", "constant predictor", "un-adapted model", ..."""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Built:
    """What ``build`` returns: the model, the training task, and the state evaluation needs."""

    model: Any
    task: Any
    """An ``engine.task.TaskSpec``."""
    state: dict[str, Any] = field(default_factory=dict)
    """Tokenizer, tokenized evaluation sets, method info...: read by baseline() and report()."""
    baseline: Baseline | None = None
    """Filled in by the engine (before training, or from the run dir on resume)."""


def margin_for_rate(baseline: float, n: int, z: float = 2.0) -> float:
    """Two standard errors of a rate ``baseline`` on ``n`` items: sqrt(b (1 - b) / n) * z.

    An accuracy within this of the majority-class rate is indistinguishable from it."""
    b = min(max(baseline, 0.0), 1.0)
    return z * math.sqrt(max(b * (1 - b), 1.0 / max(n, 1)) / max(n, 1))


@dataclass
class Result:
    """One run's outcome in the common schema (see the module docstring)."""

    experiment: str
    main_metric: str
    score: float
    metrics: dict[str, float]
    greater_is_better: bool = True
    baseline: Baseline | None = None
    margin: float = 0.0
    """How far past the baseline (in the good direction) counts as learned."""
    trainable_params: int = 0
    total_params: int = 0
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def learned(self) -> bool | None:
        """Clearly better than the baseline; None when there is no baseline to compare with."""
        if self.baseline is None or not math.isfinite(self.score):
            return None if self.baseline is None else False
        gain = self.score - self.baseline.score if self.greater_is_better else self.baseline.score - self.score
        return gain > self.margin

    def to_dict(self) -> dict[str, Any]:
        base = None if self.baseline is None else {
            "score": self.baseline.score, "kind": self.baseline.kind, "metrics": self.baseline.metrics}
        return {"experiment": self.experiment, "main_metric": self.main_metric,
                "greater_is_better": self.greater_is_better, "score": self.score, "baseline": base,
                "margin": self.margin, "learned": self.learned, "metrics": self.metrics,
                "params": {"trainable": self.trainable_params, "total": self.total_params},
                "wall_seconds": self.wall_seconds, "tokens_per_second": self.tokens_per_second,
                "details": self.details}


@runtime_checkable
class Experiment(Protocol):
    name: str
    data_config: type
    sections: tuple[str, ...]
    presets: dict[str, dict]

    def build(self, cfg: Any) -> Built: ...

    def baseline(self, built: Built) -> Baseline | None: ...

    def report(self, built: Built, fit: Any, run_dir: Any) -> Result: ...


_REGISTRY: dict[str, Experiment] = {}
_discovered = False


def register_experiment(experiment: Experiment) -> Experiment:
    """Make ``experiment`` known under ``experiment.name`` (replacing an earlier one of that name)."""
    missing = [a for a in ("name", "data_config", "sections", "presets", "build", "baseline", "report")
               if not hasattr(experiment, a)]
    if missing:
        raise TypeError(f"{type(experiment).__name__} is not an Experiment: it lacks {missing}")
    _REGISTRY[experiment.name] = experiment
    return experiment


def discover() -> None:
    """Import the experiment modules named by entry points and by $LORALAB_EXPERIMENTS (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(","))):
        importlib.import_module(module)


def experiments() -> dict[str, Experiment]:
    discover()
    return dict(_REGISTRY)


class UnknownExperimentError(ConfigError):
    pass


def get_experiment(name: str) -> Experiment:
    known = experiments()
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownExperimentError(
            f"unknown experiment {name!r}{hint} (known: {', '.join(sorted(known)) or 'none'}; a plugin module "
            f"registers itself when imported: list it in ${PLUGIN_ENV} or the {ENTRY_POINT_GROUP!r} entry points)")
    return known[name]
