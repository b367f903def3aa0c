"""Running a run: create (or reopen) its dir, build the experiment, measure the baseline, fit, report.

    run = create_run(cfg)                      config.yaml, env.json, a registry row
    built = experiment.build(cfg)              model, TaskSpec, state for evaluation
    set_precision(cfg, built, run.dir)         model.compute_dtype: frozen weights cast, env.json "compute"
    built.baseline = experiment.baseline(built) before training (or baseline.json on resume)
    fit(built.model, built.task, cfg.train)    checkpoints, metrics.jsonl
    result = experiment.report(built, fit, run.dir)
    run.finish(result)                         results.json in the common schema

The CLI only parses arguments and calls these functions (``run_training``, ``evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from loralab.core.blocks import QV_PAIRS
from loralab.engine.config import RunConfig, config_to_dict, save_config
from loralab.engine.experiment import Baseline, Built, Result, get_experiment
from loralab.engine.runs import create_run, headline, open_run

BASELINE_FILE = "baseline.json"
RESUME_SAFE_KEYS = ("train.epochs", "train.max_steps", "train.quiet", "train.log_every", "train.tensorboard",
                    "train.save_every")
"""Keys an override may change when resuming: they extend or observe the run but do not alter its math."""


class Interrupted(Exception):
    """The trainer stopped on Ctrl-C / SIGTERM and returned (after saving a checkpoint); exit code 130."""


class RunFailed(Exception):
    """The run ran but produced no result to trust (a NaN loss or evaluation): the run is marked failed and
    the CLI prints this message (exit 2); it is not a bug of loralab, and there is no traceback."""


# The config's default lora.target_modules ["query", "value"] means W_q and W_v in the architecture's own
# names (core.blocks.QV_NAMES / QV_PAIRS).
DEFAULT_TARGETS = ["query", "value"]
LORA_KEYS = ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern")
"""What an adapter fixes about the LoRA it carries: a warm start must be configured the same."""


def _targets(value: Any, fused: dict | None) -> Any:
    if isinstance(value, str):
        return value
    return sorted(set(value or []) | set(fused or {}))


def lora_differences(lora: Any, saved: Any) -> dict[str, tuple[Any, Any]]:
    """{key: (config's value, adapter's value)} for the LoRA settings where the run's ``lora`` section and
    the adapter's config (a core ``LoraConfig``) disagree."""
    diffs = {}
    for key in LORA_KEYS:
        mine, theirs = getattr(lora, key), getattr(saved, key)
        if key == "target_modules":
            theirs = _targets(theirs, saved.fused_qkv)
            if mine == DEFAULT_TARGETS and not lora.fused_qkv and (frozenset(theirs) in QV_PAIRS or saved.fused_qkv):
                continue  # W_q, W_v in this architecture's names
            mine = _targets(mine, lora.fused_qkv)
        elif key in ("r", "lora_alpha"):
            mine, theirs = float(mine), float(theirs)
        elif key in ("rank_pattern", "alpha_pattern"):
            mine, theirs = dict(mine or {}), dict(theirs or {})
        if mine != theirs:
            diffs[key] = (getattr(lora, key), getattr(saved, key))
    return diffs


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_warm_start(cfg: RunConfig) -> None:
    """Before a run dir exists: ``lora.init_from``'s files are sound, and its LoRA settings are the config's.

    The adapter fixes its rank, alpha and targets; training it under a config that says otherwise would
    record a run that never happened (config.yaml r=16 while r=4 trains). So a mismatch is refused, naming
    the overrides that describe the adapter."""
    if not cfg.lora.init_from or cfg.lora.method != "lora":
        return
    from loralab.core.adapter_io import check_adapter_files
    from loralab.engine.config import ConfigError

    saved, _ = check_adapter_files(cfg.lora.init_from, heads_required=False)
    diffs = lora_differences(cfg.lora, saved)
    if diffs:
        said = ", ".join(f"lora.{k}={_fmt(mine)}" for k, (mine, _) in diffs.items())
        fix = " ".join(f"lora.{k}={_fmt(theirs)}" for k, (_, theirs) in diffs.items())
        raise ConfigError(f"lora.init_from={cfg.lora.init_from} is an adapter with other LoRA settings than this "
                          f"run's ({said}); a warm start continues the adapter as it is: set {fix}")


def adapter_config(cfg: RunConfig, adapter: str | Path, allow_fresh_head: bool = False) -> RunConfig:
    """``cfg`` evaluating ``adapter``: its files checked (a head it lists must be in it unless
    ``allow_fresh_head``), its LoRA settings recorded in the config (they, not the config, say what runs)."""
    from loralab.core.adapter_io import check_adapter_files

    method = _saved_method(adapter)
    if method != "lora":  # an adapter / prefix / ft_top2 dir: core.methods.load_method checks and loads it
        return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, init_from=str(adapter), method=method))
    saved, _ = check_adapter_files(adapter, heads_required=not allow_fresh_head)
    settings = {k: getattr(saved, k) for k in LORA_KEYS if k != "target_modules"}
    targets = saved.target_modules if isinstance(saved.target_modules, str) else \
        sorted(set(saved.target_modules or []) - set(saved.fused_qkv or {}))
    if targets or saved.fused_qkv:
        settings.update(target_modules=targets or cfg.lora.target_modules, fused_qkv=dict(saved.fused_qkv or {}))
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, init_from=str(adapter), method="lora",
                                                              **settings))


def _saved_method(adapter: str | Path) -> str:
    """The ``method`` an adapter dir's adapter_config.json records (PEFT's LoRA files have none: lora)."""
    from loralab.core.adapter_io import read_config_json

    try:
        saved = read_config_json(adapter)
    except (OSError, ValueError):
        return "lora"  # unreadable: check_adapter_files says what is wrong with it
    return str(saved.get("method") or "lora")


def check_head_loaded(built: Built, adapter: Any) -> None:
    """After build with an adapter: refuse a model whose head was re-created instead of loaded."""
    warm = (built.state.get("method") or {}).get("warm_start") if isinstance(built.state, dict) else None
    if isinstance(warm, dict) and warm.get("head_loaded") is False:
        from loralab.core.adapter_io import AdapterFileError

        raise AdapterFileError(f"adapter {adapter} does not carry this model's head (it was re-created with a fresh "
                               "initialisation): its scores would be those of an untrained head. Use the adapter of "
                               "this task, or pass --allow-fresh-head if that is what you want")


def changed_keys(saved: RunConfig, cfg: RunConfig) -> list[str]:
    old, new = headline(config_to_dict(saved)), headline(config_to_dict(cfg))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_resumable(saved: RunConfig, cfg: RunConfig) -> None:
    unsafe = [k for k in changed_keys(saved, cfg) if k not in RESUME_SAFE_KEYS]
    if unsafe:
        from loralab.engine.config import ConfigError

        raise ConfigError(f"cannot change {', '.join(unsafe)} when resuming (it would not be the same run); "
                          f"allowed: {', '.join(RESUME_SAFE_KEYS)}")


def _open(cfg: RunConfig, resume: str | Path | None, run_dir: str | Path | None) -> Any:
    """Rank 0 creates or reopens the run; the ownership check comes before anything is written."""
    if resume is None:
        return create_run(cfg, run_dir=run_dir)
    run = open_run(resume)
    run.mark_running()  # refuses a run another live process owns: nothing of it is touched before this
    save_config(cfg, run.dir / "config.yaml")
    return run


def _main_process_run(cfg: RunConfig, resume: str | Path | None, run_dir: str | Path | None) -> tuple[Any, Path]:
    from loralab.engine import distributed as ddp  # lazily: torch

    ddp.init()
    run = None
    if ddp.is_main():
        run = _open(cfg, resume, run_dir)
        if not cfg.train.quiet:
            print(f"run {run.id[:8]}: {run.dir}", file=sys.stderr, flush=True)
    if not ddp.active():
        return run, run.dir
    import torch.distributed as dist

    shared = [str(run.dir) if run is not None else None]
    dist.broadcast_object_list(shared, src=0)
    return run, Path(shared[0])


def set_precision(cfg: RunConfig, built: Built, run_dir: Path | None) -> Any:
    """Resolve ``model.compute_dtype`` for the model's device, cast the frozen weights to it (trainable
    ones to float32: ``core.precision.cast_frozen``) and record the choice in the run's env.json."""
    import torch

    from loralab.core.precision import cast_frozen, resolve_compute_dtype

    device = next((p.device for p in built.model.parameters()), torch.device("cpu"))
    dtype, reason = resolve_compute_dtype(cfg.model.compute_dtype, device)
    counts = cast_frozen(built.model, dtype)
    env = run_dir / "env.json" if run_dir is not None else None
    if env is not None and env.is_file():
        record = json.loads(env.read_text())
        record["compute"] = {"setting": cfg.model.compute_dtype, "dtype": str(dtype).removeprefix("torch."),
                             "reason": reason, **counts}
        _write_json(env, record)
    return dtype


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file renamed into place (one per process: two
    sweep jobs may write the same shared baseline at once)."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _compute(dtype: Any, built: Built) -> Any:
    from loralab.core.precision import compute_context

    return compute_context(dtype, next((p.device for p in built.model.parameters()), "cpu"))


def baseline_key(cfg: RunConfig, dtype: Any) -> str:
    """What an un-adapted baseline can depend on, hashed: the experiment, the model, data and generate
    sections, the seed and the resolved compute dtype (never the method or the training recipe)."""
    import hashlib

    record = {k: v for k, v in config_to_dict(cfg).items() if k in ("experiment", "model", "data", "generate")}
    record.update(seed=cfg.train.seed, compute=str(dtype))
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:20]


def measure_baseline(experiment: Any, built: Built, run_dir: Path | None, cache: Path | None = None,
                     key: str | None = None) -> Baseline | None:
    """The experiment's baseline, measured once per run: a resumed run reads it back from the run dir.

    ``cache`` (``loralab sweep`` passes its own): a dir of baselines by ``key`` (``baseline_key``), shared
    by runs that differ only in method or recipe, so a sweep measures each baseline once. Only an
    experiment that declares ``shared_baseline = True`` (its baseline is a function of the key's fields
    alone: no random head, no state left for its report) uses it."""
    path = run_dir / BASELINE_FILE if run_dir is not None else None
    if path is not None and path.is_file():
        return Baseline(**json.loads(path.read_text()))
    shared = cache / f"{key}.json" if cache is not None and key and getattr(experiment, "shared_baseline", False) \
        else None
    if shared is not None and shared.is_file():
        baseline = Baseline(**json.loads(shared.read_text()))
        print(f"[baseline] {baseline.kind}: {baseline.score:.4g}, measured by an earlier run of this sweep "
              f"({shared})", file=sys.stderr, flush=True)
    else:
        baseline = experiment.baseline(built)
        if shared is not None and baseline is not None:
            shared.parent.mkdir(parents=True, exist_ok=True)
            _write_json(shared, dataclasses.asdict(baseline))
    if path is not None and baseline is not None:
        _write_json(path, dataclasses.asdict(baseline))
    return baseline


def _non_finite(result: Result) -> dict[str, Any]:
    values = {result.main_metric: result.score, **(result.metrics or {})}
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)}


def result_record(cfg: RunConfig, result: Result, started: float, fit: Any = None) -> dict[str, Any]:
    """``results.json``: the result in the common schema, plus what ran (``run``).

    A non-finite score or metric is no result (``RunFailed``). A fit that diverged (the trainer's rule) is
    recorded as ``details.diverged`` and is never ``learned``."""
    broken = _non_finite(result)
    if broken:
        raise RunFailed(f"the final evaluation returned non-finite {broken}: the model's outputs are NaN/Inf, so "
                        "this is no score. For a trained run, check train/loss in metrics.jsonl and lower "
                        "train.lr or set train.max_grad_norm; for an adapter, its weights hold NaN/Inf")
    if not result.wall_seconds:
        result.wall_seconds = time.time() - started
    record = result.to_dict()
    if getattr(fit, "diverged", False):
        record["learned"] = False
        record["details"] = {**(record.get("details") or {}), "diverged": True}
    record["run"] = {"name": cfg.run_name, "model": cfg.model.name, "task": cfg.task_label,
                     "method": cfg.lora.method, "seed": cfg.train.seed}
    return record


def run_training(cfg: RunConfig, resume: str | Path | None = None, run_dir: str | Path | None = None,
                 opened: Any = None, baseline_cache: Path | None = None) -> tuple[Any, dict]:
    """Create (or reopen) the run, build the experiment, measure its baseline, fit, report, record.

    Returns ``(run, results)`` (``run`` is None on ranks other than 0, which neither report nor
    record). On failure the run is marked failed (traceback in error.txt) and the exception
    propagates; on Ctrl-C it is marked interrupted (resume it with ``--resume RUN_DIR``).
    ``opened``: a run already opened by this process, trained from step 0 in its own dir;
    ``baseline_cache``: baselines shared with other runs (``measure_baseline``)."""
    from loralab.engine.trainer import fit  # lazily: the trainer pulls in torch

    from loralab.engine.trainer import NonFiniteLossError, NonFiniteMetricError

    started = time.time()
    experiment = get_experiment(cfg.experiment)  # import problems surface before a run dir exists
    if resume is None and opened is None:
        check_warm_start(cfg)  # a damaged or mismatched lora.init_from: refused before a run dir exists
    run, path = (opened, opened.dir) if opened is not None else _main_process_run(cfg, resume, run_dir)
    try:
        built = experiment.build(cfg)
        dtype = set_precision(cfg, built, path if run is not None else None)
        with _compute(dtype, built):
            built.baseline = measure_baseline(experiment, built, path if run is not None else None,
                                              baseline_cache, baseline_key(cfg, dtype))
        fit_result = fit(built.model, built.task, cfg.train, run_dir=path, resume=resume is not None,
                         compute_dtype=dtype)
        if getattr(fit_result, "status", None) == "interrupted":
            raise Interrupted()
        if run is not None:
            with _compute(dtype, built):
                report = experiment.report(built, fit_result, path)
            results = result_record(cfg, report, started, fit_result)
            run.finish(results)  # inside: a full disk here marks the run failed, it does not stay "running"
        else:
            results = {}
    except (KeyboardInterrupt, Interrupted):
        if run is not None:
            run.fail(f"interrupted; resume with: loralab train --resume {run.dir}", status="interrupted")
        raise
    except (NonFiniteLossError, NonFiniteMetricError, RunFailed) as err:
        if run is not None:
            run.fail(f"{type(err).__name__}: {err}")
        raise err if isinstance(err, RunFailed) else RunFailed(str(err)) from err
    except BaseException:
        if run is not None:
            run.fail(traceback.format_exc())
        raise
    return run, results


def evaluate(cfg: RunConfig, adapter: str | Path | None, allow_fresh_head: bool = False) -> tuple[Any, dict]:
    """Evaluate ``adapter`` (None: the base model) with the experiment's report; recorded as a new run.

    The adapter is checked before the run is created (damaged files, a pickle, a head it lists but lacks);
    its LoRA settings go into the run's config; a head re-created instead of loaded is refused unless
    ``allow_fresh_head``; a non-finite score is an error (``RunFailed``), never a result."""
    if adapter:
        cfg = adapter_config(cfg, adapter, allow_fresh_head)
    else:
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, init_from=None))
    cfg = dataclasses.replace(cfg, name=f"eval-{cfg.run_name}")
    started = time.time()
    experiment = get_experiment(cfg.experiment)
    run = create_run(cfg)
    try:
        built = experiment.build(cfg)
        if adapter and not allow_fresh_head:
            check_head_loaded(built, adapter)
        dtype = set_precision(cfg, built, run.dir)
        with _compute(dtype, built):
            built.baseline = measure_baseline(experiment, built, run.dir)
            report = experiment.report(built, None, run.dir)
        results = result_record(cfg, report, started)
        run.finish(results)
    except RunFailed as err:
        run.fail(f"{type(err).__name__}: {err}")
        raise
    except BaseException:
        run.fail(traceback.format_exc())
        raise
    return run, results


def run_at(cfg: RunConfig, run_dir: str | Path, baseline_cache: Path | None = None) -> tuple[Any, dict]:
    """Run ``cfg`` in exactly ``run_dir``: create it, or finish it if a previous process left it.

    Completed: nothing runs, its results are returned. Interrupted with a checkpoint: resumed exactly.
    Interrupted before its first checkpoint: started again in the same dir (same registry id)."""
    from loralab.engine.checkpoint import latest_checkpoint
    from loralab.engine.config import load_config
    from loralab.engine.runs import REGISTRY, get_run

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        return run_training(cfg, run_dir=run_dir, baseline_cache=baseline_cache)
    check_resumable(load_config(run_dir / "config.yaml"), cfg)
    results = run_dir / "results.json"
    if results.is_file() and (run_dir.parent / REGISTRY).is_file() \
            and get_run(run_dir.parent, run_dir.name).status == "completed":
        return open_run(run_dir), json.loads(results.read_text())
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return run_training(cfg, resume=run_dir, baseline_cache=baseline_cache)
    run = open_run(run_dir)
    run.mark_running()  # refuses a dir another live process still runs
    for stale in ("metrics.jsonl", BASELINE_FILE, "error.txt", "fit.json"):
        (run_dir / stale).unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_training(cfg, opened=run, baseline_cache=baseline_cache)
