"""``loralab sweep``: a grid of ordinary runs, resumable, with its table.

    loralab sweep --preset P [key=value ...] [key=v1,v2,...] [--seeds 0,1,2] [--jobs N] --out DIR
    loralab sweep --sweep NAME [key=value ...] --out DIR      (a named sweep of an experiment's ``sweeps``)

The grid is the cartesian product of the comma-separated keys (a list-typed key takes bracketed
values: ``lora.target_modules=[q,v],[q,k,v]``), times the seeds (``train.seed``). Each point-seed is
an ordinary run dir ``DIR/runs/<key-value...>-s<seed>`` (registry ``DIR/runs/runs.sqlite``), trained in
its own process (``loralab train --run-dir``), so rerunning the same command skips completed runs and
resumes interrupted ones. Runs that differ only in method or recipe share their un-adapted baseline
(measured once, kept in ``DIR/baselines``; ``engine.runner.measure_baseline``). ``--jobs N`` runs N at
once and gives each ``cpu_count // N`` threads.
After every finished run ``DIR/sweep.json`` and ``DIR/sweep.md`` are rewritten (atomically):

    {"preset", "fixed", "grid", "seeds", "main_metric", "greater_is_better",
     "points": [{"overrides", "runs", "status", "scores", "baselines", "learned",
                 "score" (median), "spread" [min, max], "baseline" (median), "metrics" (medians)}],
     "reference" (a named sweep's paper numbers, or null)}

A named sweep (an experiment's ``sweeps``: {name: {"preset", "grid", "fixed", "seeds", "reference"}}) is
the same grid with a reference: ``{"label", "key", "metrics": {name: scale}, "rows": {value: {name: paper
number}}}``; sweep.md then adds a table of each point's medians (times ``scale``, into the paper's units)
beside the paper's numbers and the deviation 100 (ours - paper) / paper, the "percentual deviation" the
seed study reported.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import typing
from pathlib import Path
from typing import Any

import yaml

from loralab.engine.typed_config import ConfigError

SPEC_KEYS = ("preset", "config", "fixed", "grid", "seeds")


def parse_items(items: list[str], list_keys: set[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``key=value`` words -> (fixed overrides, grid {key: [values]}) as override text."""
    fixed: dict[str, str] = {}
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"sweep: {item!r} is not key=value or key=v1,v2,...")
        if key in list_keys and raw.startswith("[") and "],[" in raw.replace(" ", ""):
            values = [yaml.safe_dump(v, default_flow_style=True).strip() for v in yaml.safe_load(f"[{raw}]")]
        elif key not in list_keys and "," in raw and not raw.startswith(("[", "{")):
            values = [v.strip() for v in raw.split(",") if v.strip()]
        else:
            fixed[key] = raw
            continue
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep: {key} lists a value twice ({raw})")
        grid[key] = values
    return fixed, grid


def _slug(overrides: dict[str, str]) -> str:
    text = "_".join(f"{k}-{v}" for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", text)[:120]


def points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _list_keys(preset: str | None, config: str | None, fixed: list[str]) -> set[str]:
    """Keys whose type is a list (a comma inside their value is a list, not a grid)."""
    from loralab.engine.config import load_config, sections_for

    cfg = load_config(config, fixed, preset=preset)
    out = set()
    for section, cls in sections_for(cfg.experiment).items():
        for name, tp in typing.get_type_hints(cls).items():
            if list in (typing.get_origin(tp), *map(typing.get_origin, typing.get_args(tp))):
                out.add(f"{section}.{name}")
    return out


def _run_one(argv: list[str], log: Path, threads: int, echo: Any) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    echo(f"sweep: {log.stem} started ({threads} thread{'s' if threads > 1 else ''}; log {log})")
    with open(log, "a") as fh:
        return subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL).returncode


def _registered_complete(run_dir: Path) -> bool:
    """The registry says completed (results.json alone can predate a kill before the row was updated)."""
    from loralab.engine.runs import REGISTRY, get_run

    try:
        return (run_dir.parent / REGISTRY).is_file() and get_run(run_dir.parent, run_dir.name).status == "completed"
    except KeyError:
        return False


def _read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file() or not _registered_complete(run_dir):
        return {"status": "missing" if not run_dir.exists() else "incomplete"}
    res = json.loads(path.read_text())
    return {"status": "completed", "score": res.get("score"), "baseline": (res.get("baseline") or {}).get("score"),
            "learned": res.get("learned"), "main_metric": res.get("main_metric"),
            "greater_is_better": res.get("greater_is_better", True), "metrics": res.get("metrics") or {}}


def _medians(read: list[dict[str, Any]]) -> dict[str, float]:
    names = dict.fromkeys(k for r in read for k in r.get("metrics", {}))
    values = {k: [r["metrics"][k] for r in read if isinstance(r.get("metrics", {}).get(k), (int, float))]
              for k in names}
    return {k: statistics.median(v) for k, v in values.items() if v}


def summarize(out: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """sweep.json's content from the run dirs as they are now."""
    rows, metric, greater = [], None, True
    for point in points(spec["grid"]):
        runs = [out / "runs" / f"{_slug(point)}-s{seed}" for seed in spec["seeds"]]
        read = [_read_run(r) for r in runs]
        scores = [r.get("score") for r in read]
        done = [s for s in scores if s is not None]
        bases = [r["baseline"] for r in read if r.get("baseline") is not None]
        metric = metric or next((r["main_metric"] for r in read if r.get("main_metric")), None)
        greater = next((r["greater_is_better"] for r in read if "greater_is_better" in r), greater)
        rows.append({"overrides": point, "runs": [str(r.relative_to(out)) for r in runs],
                     "status": [r["status"] for r in read], "scores": scores,
                     "baselines": [r.get("baseline") for r in read], "learned": [r.get("learned") for r in read],
                     "score": statistics.median(done) if done else None,
                     "spread": [min(done), max(done)] if done else None,
                     "baseline": statistics.median(bases) if bases else None, "metrics": _medians(read)})
    return {**{k: spec[k] for k in SPEC_KEYS}, "main_metric": metric, "greater_is_better": greater, "points": rows,
            "reference": spec.get("reference")}


def reference_markdown(summary: dict[str, Any]) -> list[str]:
    """The points beside a named sweep's paper numbers, with the deviation in percent."""
    ref = summary.get("reference")
    if not ref:
        return []
    key, metrics = ref["key"], ref["metrics"]
    head = [key] + [f"{m} {who}" for m in metrics for who in ("ours", "paper", "Δ%")]
    lines = ["", f"## Beside {ref['label']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in summary["points"]:
        value = p["overrides"].get(key)
        paper = ref["rows"].get(str(value), {})
        cells = [str(value)]
        for m, scale in metrics.items():
            ours = p.get("metrics", {}).get(m)
            ours = None if ours is None else ours * scale
            theirs = paper.get(m)
            dev = 100 * (ours - theirs) / theirs if ours is not None and theirs else None
            cells += [f"{ours:.4g}" if ours is not None else "—", f"{theirs:.4g}" if theirs is not None else "—",
                      f"{dev:+.1f}" if dev is not None else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    if ref.get("note"):
        lines += ["", ref["note"]]
    return lines


def to_markdown(summary: dict[str, Any]) -> str:
    keys = list(summary["grid"])
    head = [*keys, f"{summary['main_metric'] or 'score'} (median)", "min–max", "seeds", "baseline", "learned"]
    lines = [f"# Sweep: preset {summary['preset']}" + (f", fixed {summary['fixed']}" if summary["fixed"] else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in summary["points"]:
        n_done = sum(s is not None for s in p["scores"])
        learned = sum(bool(x) for x in p["learned"])
        mark = f"{learned}/{n_done}" + ("" if learned == n_done or not n_done else " ✗ at baseline")
        cells = [p["overrides"][k] for k in keys] + [
            f"{p['score']:.4f}" if p["score"] is not None else "—",
            f"{p['spread'][0]:.4f}–{p['spread'][1]:.4f}" if p["spread"] else "—",
            f"{n_done}/{len(p['scores'])}", f"{p['baseline']:.4f}" if p["baseline"] is not None else "—", mark]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "learned k/n: k of the n finished seeds beat the baseline (the un-adapted model or the majority "
              "class) clearly; a row at the baseline is a failed run, never agreement with a paper."]
    return "\n".join(lines + reference_markdown(summary)) + "\n"


def named_sweeps() -> dict[str, dict[str, Any]]:
    """Every experiment's named sweeps (``Experiment.sweeps``, optional), by name."""
    from loralab.engine.experiment import experiments

    found: dict[str, dict[str, Any]] = {}
    for exp in experiments().values():
        found.update(getattr(exp, "sweeps", None) or {})
    return found


def resolve_named(name: str, items: list[str], seeds: list[int] | None) -> tuple[str, list[str], list[int], dict]:
    """(preset, items, seeds, reference) of the named sweep ``name``; the user's key=value items come after
    the sweep's own (a fixed key overrides the sweep's; a grid key given again replaces its values)."""
    import difflib

    sweeps = named_sweeps()
    if name not in sweeps:
        close = difflib.get_close_matches(name, list(sweeps), n=1)
        raise ConfigError(f"unknown sweep {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                          + f" (named sweeps: {', '.join(sorted(sweeps)) or 'none'})")
    spec = sweeps[name]
    mine = {item.partition("=")[0] for item in items}
    own = [f"{k}={','.join(map(str, v))}" for k, v in spec.get("grid", {}).items() if k not in mine]
    own += [f"{k}={v}" for k, v in spec.get("fixed", {}).items() if k not in mine]
    return spec["preset"], own + items, seeds or list(spec.get("seeds", [0])), spec.get("reference") or {}


def _write(out: Path, summary: dict[str, Any]) -> None:
    for name, text in (("sweep.json", json.dumps(summary, indent=2) + "\n"), ("sweep.md", to_markdown(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def run_sweep(out: str | Path, preset: str | None, items: list[str], seeds: list[int], jobs: int = 1,
              config: str | None = None, echo: Any = print, reference: dict | None = None) -> dict[str, Any]:
    """Run (or finish) the sweep in ``out``; returns the summary written to sweep.json."""
    out = Path(out).resolve()
    lock = threading.Lock()
    say = echo

    def echo(text: str) -> None:  # the job threads print too: one whole line at a time
        with lock:
            say(text)

    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if not seeds:
        raise ConfigError("--seeds is empty; give e.g. --seeds 0,1,2")
    plain = [i for i in items if "," not in i.partition("=")[2]]
    fixed, grid = parse_items(items, _list_keys(preset, config, plain))
    spec = {"preset": preset, "config": config, "fixed": fixed, "grid": grid, "seeds": list(seeds),
            "reference": reference or None}
    previous = out / "sweep.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if {k: old.get(k) for k in SPEC_KEYS} != {k: spec[k] for k in SPEC_KEYS}:
            raise ConfigError(f"{out} holds another sweep ({ {k: old.get(k) for k in SPEC_KEYS} }); "
                              "rerun that command to finish it, or choose a new --out")
    from loralab.engine.config import load_config

    for point in points(grid):  # every point must resolve before anything runs
        load_config(config, [f"{k}={v}" for k, v in {**fixed, **point}.items()], preset=preset)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    _write(out, summarize(out, spec))
    todo = []
    for point in points(grid):
        for seed in seeds:
            run_dir = out / "runs" / f"{_slug(point)}-s{seed}"
            if _read_run(run_dir)["status"] == "completed":
                echo(f"sweep: {run_dir.name} completed earlier: skipped")
                continue
            argv = [sys.executable, "-m", "loralab", "train", *([config] if config else []),
                    *(["--preset", preset] if preset else []), *(f"{k}={v}" for k, v in {**fixed, **point}.items()),
                    f"train.seed={seed}", "train.quiet=true", "--run-dir", str(run_dir),
                    "--baseline-cache", str(out / "baselines")]
            todo.append((run_dir, argv))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_run_one, argv, out / "logs" / f"{d.name}.log", threads, echo): d for d, argv in todo}
        for future in concurrent.futures.as_completed(futures):
            run_dir, code = futures[future], future.result()
            echo(f"sweep: {run_dir.name} " + ("finished" if code == 0 else f"FAILED (exit {code}); log: "
                                              f"{out / 'logs' / (run_dir.name + '.log')}"))
            if code != 0:
                failed.append(run_dir.name)
            _write(out, summarize(out, spec))
    summary = summarize(out, spec)
    _write(out, summary)
    if failed:
        raise RuntimeError(f"sweep: {len(failed)} run(s) failed ({', '.join(failed[:5])}); see {out / 'logs'}; "
                           "rerun the same command to retry them")
    return summary
