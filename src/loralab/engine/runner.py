"""Running a run: create (or reopen) its dir, build the experiment, measure the baseline, fit, report.

    run = create_run(cfg)                      config.yaml, env.json, a registry row
    built = experiment.build(cfg)              model, TaskSpec, state for evaluation
    built.baseline = experiment.baseline(built) before training (or baseline.json on resume)
    fit(built.model, built.task, cfg.train)    checkpoints, metrics.jsonl
    result = experiment.report(built, fit, run.dir)
    run.finish(result)                         results.json in the common schema

The CLI only parses arguments and calls these functions (``run_training``, ``evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from loralab.engine.config import RunConfig, config_to_dict, save_config
from loralab.engine.experiment import Baseline, Built, Result, get_experiment
from loralab.engine.runs import create_run, headline, open_run

BASELINE_FILE = "baseline.json"
RESUME_SAFE_KEYS = ("train.epochs", "train.max_steps", "train.quiet", "train.log_every", "train.tensorboard",
                    "train.save_every")
"""Keys an override may change when resuming: they extend or observe the run but do not alter its math."""


class Interrupted(Exception):
    """The trainer stopped on Ctrl-C / SIGTERM and returned (after saving a checkpoint); exit code 130."""


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


def measure_baseline(experiment: Any, built: Built, run_dir: Path | None) -> Baseline | None:
    """The experiment's baseline, measured once per run: a resumed run reads it back from the run dir."""
    path = run_dir / BASELINE_FILE if run_dir is not None else None
    if path is not None and path.is_file():
        return Baseline(**json.loads(path.read_text()))
    baseline = experiment.baseline(built)
    if path is not None and baseline is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(baseline), indent=2) + "\n")
        tmp.replace(path)
    return baseline


def result_record(cfg: RunConfig, result: Result, started: float) -> dict[str, Any]:
    """``results.json``: the result in the common schema, plus what ran (``run``)."""
    if not result.wall_seconds:
        result.wall_seconds = time.time() - started
    record = result.to_dict()
    record["run"] = {"name": cfg.run_name, "model": cfg.model.name, "task": cfg.task_label,
                     "method": cfg.lora.method, "seed": cfg.train.seed}
    return record


def run_training(cfg: RunConfig, resume: str | Path | None = None, run_dir: str | Path | None = None,
                 opened: Any = None) -> tuple[Any, dict]:
    """Create (or reopen) the run, build the experiment, measure its baseline, fit, report, record.

    Returns ``(run, results)`` (``run`` is None on ranks other than 0, which neither report nor
    record). On failure the run is marked failed (traceback in error.txt) and the exception
    propagates; on Ctrl-C it is marked interrupted (resume it with ``--resume RUN_DIR``).
    ``opened``: a run already opened by this process, trained from step 0 in its own dir."""
    from loralab.engine.trainer import fit  # lazily: the trainer pulls in torch

    started = time.time()
    experiment = get_experiment(cfg.experiment)  # import problems surface before a run dir exists
    run, path = (opened, opened.dir) if opened is not None else _main_process_run(cfg, resume, run_dir)
    try:
        built = experiment.build(cfg)
        built.baseline = measure_baseline(experiment, built, path if run is not None else None)
        fit_result = fit(built.model, built.task, cfg.train, run_dir=path, resume=resume is not None)
        if getattr(fit_result, "status", None) == "interrupted":
            raise Interrupted()
        results = result_record(cfg, experiment.report(built, fit_result, path), started) if run else {}
    except (KeyboardInterrupt, Interrupted):
        if run is not None:
            run.fail(f"interrupted; resume with: loralab train --resume {run.dir}", status="interrupted")
        raise
    except BaseException:
        if run is not None:
            run.fail(traceback.format_exc())
        raise
    if run is not None:
        run.finish(results)
    return run, results


def evaluate(cfg: RunConfig, adapter: str | Path | None) -> tuple[Any, dict]:
    """Evaluate ``adapter`` (None: the base model) with the experiment's report; recorded as a new run."""
    cfg = dataclasses.replace(cfg, name=f"eval-{cfg.run_name}",
                              lora=dataclasses.replace(cfg.lora, init_from=str(adapter) if adapter else None))
    started = time.time()
    experiment = get_experiment(cfg.experiment)
    run = create_run(cfg)
    try:
        built = experiment.build(cfg)
        built.baseline = measure_baseline(experiment, built, run.dir)
        results = result_record(cfg, experiment.report(built, None, run.dir), started)
    except BaseException:
        run.fail(traceback.format_exc())
        raise
    run.finish(results)
    return run, results


def run_at(cfg: RunConfig, run_dir: str | Path) -> tuple[Any, dict]:
    """Run ``cfg`` in exactly ``run_dir``: create it, or finish it if a previous process left it.

    Completed: nothing runs, its results are returned. Interrupted with a checkpoint: resumed exactly.
    Interrupted before its first checkpoint: started again in the same dir (same registry id)."""
    from loralab.engine.checkpoint import latest_checkpoint
    from loralab.engine.config import load_config
    from loralab.engine.runs import REGISTRY, get_run

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        return run_training(cfg, run_dir=run_dir)
    check_resumable(load_config(run_dir / "config.yaml"), cfg)
    results = run_dir / "results.json"
    if results.is_file() and (run_dir.parent / REGISTRY).is_file() \
            and get_run(run_dir.parent, run_dir.name).status == "completed":
        return open_run(run_dir), json.loads(results.read_text())
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return run_training(cfg, resume=run_dir)
    run = open_run(run_dir)
    run.mark_running()  # refuses a dir another live process still runs
    for stale in ("metrics.jsonl", BASELINE_FILE, "error.txt", "fit.json"):
        (run_dir / stale).unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_training(cfg, opened=run)
