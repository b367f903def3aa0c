"""Readers for the directories a report draws from: a run, a sweep, an analysis.

Each reader returns plain data (dataclasses of dicts and lists) and raises ``ReportError`` with a
message naming the file and the fix when a directory cannot be read. Nothing here imports torch or
the engine: the files are read directly (JSON, JSON lines, YAML).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

RUN_FILES = ("results.json", "metrics.jsonl", "config.yaml")
SWEEP_FILES = ("sweep.json",)
ANALYSIS_FILES = ("subspace.json", "delta_w.json")
_SWEEP_KEYS = ("grid", "points")


class ReportError(Exception):
    """A report input that cannot be used; the message names the path and the fix (exit code 2)."""


@dataclass
class RunData:
    """One run directory. ``metrics`` holds the readable lines of ``metrics.jsonl`` in order."""

    path: Path
    config: dict[str, Any]
    env: dict[str, Any]
    metrics: list[dict[str, Any]]
    results: dict[str, Any] | None
    error: str | None = None
    preset: str | None = None
    preset_layer: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)


@dataclass
class SweepData:
    path: Path
    sweep: dict[str, Any]
    runs: dict[str, RunData]
    """Readable run dirs of the points, by the path string as written in ``sweep.json``."""
    markdown: str | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class AnalysisData:
    path: Path
    subspace: dict[str, Any] | None
    delta_w: dict[str, Any] | None
    images: list[Path]


def detect(path: Path) -> str:
    """"run", "sweep" or "analysis", from the files ``path`` holds."""
    if not path.exists():
        raise ReportError(f"{path}: no such directory; pass a run, sweep or analysis directory")
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory; pass the directory that holds it "
                          f"({path.parent}), not the file")
    if any((path / f).is_file() for f in SWEEP_FILES):
        return "sweep"
    if any((path / f).is_file() for f in ANALYSIS_FILES):
        return "analysis"
    if any((path / f).is_file() for f in RUN_FILES):
        return "run"
    inner = sorted(p for p in path.iterdir() if p.is_dir() and any((p / f).is_file() for f in RUN_FILES))
    hint = (f"; it holds {len(inner)} run dirs (e.g. {inner[0].name}): pass them, e.g. {inner[0]}"
            if inner else "")
    raise ReportError(f"{path}: not a run, sweep or analysis directory (expected one of "
                      f"{', '.join(RUN_FILES + SWEEP_FILES + ANALYSIS_FILES)}){hint}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); rewrite or remove "
                          "the file") from None
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror})") from None


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects of a ``metrics.jsonl``; unreadable lines (a killed run's last) become warnings."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    warnings = [f"{path.name}: skipped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))})"] if bad else []
    return rows, warnings


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections to dotted keys: ``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_diff(config: Mapping[str, Any], layer: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, preset value, run value)`` for each key the preset layer sets that the run changed.

    ``layer`` is the preset's overrides (nested or dotted); pass the preset's fully resolved config
    to diff every key. A key the run lacks shows as ``None`` on the run's side.
    """
    run, preset = flatten(config), flatten(layer)
    missing = object()
    rows = []
    for key in sorted(preset):
        value = run.get(key, missing)
        if value is missing or not _same(value, preset[key]):
            rows.append((key, preset[key], None if value is missing else value))
    return rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or a == b
    return a == b


def read_run(path: Path, presets: Mapping[str, Mapping[str, Any]] | None = None) -> RunData:
    """A run dir; ``presets`` ({name: overrides}) supplies the preset layer named in ``config.yaml``."""
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ReportError(f"{path / 'config.yaml'}: not valid YAML ({err}); fix or remove it") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ReportError(f"{path / 'config.yaml'}: expected a mapping of sections, got "
                              f"{type(loaded).__name__}")
        config = loaded or {}
    env = _read_mapping(path / "env.json", "the run's environment") if (path / "env.json").is_file() else {}
    metrics, warnings = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else ([], [])
    results = None
    if (path / "results.json").is_file():
        results = _read_mapping(path / "results.json", "the run's results")
    error = (path / "error.txt").read_text(encoding="utf-8", errors="replace") if (path / "error.txt").is_file() else None
    run = RunData(path, config, env, metrics, results, error, warnings=warnings)
    _attach_preset(run, presets or {})
    return run


def _attach_preset(run: RunData, presets: Mapping[str, Mapping[str, Any]]) -> None:
    preset_file = run.path / "preset.json"
    if preset_file.is_file():
        data = _read_mapping(preset_file, "the preset: {name, overrides} or its overrides")
        if "overrides" in data and isinstance(data["overrides"], dict):
            run.preset, run.preset_layer = str(data.get("name") or "preset"), data["overrides"]
        else:
            run.preset, run.preset_layer = str(run.config.get("preset") or "preset"), data
        return
    name = run.config.get("preset")
    if isinstance(name, str):
        run.preset = name
        if name in presets:
            run.preset_layer = dict(presets[name])
        else:
            run.warnings.append(f"preset {name!r} is not known to this report; no diff against it")


def _resolve(base: Path, entry: str) -> Path:
    p = Path(entry)
    return p if p.is_absolute() else base / p


def read_sweep(path: Path, presets: Mapping[str, Mapping[str, Any]] | None = None) -> SweepData:
    sweep = _read_mapping(path / "sweep.json", "the sweep")
    lacking = [k for k in _SWEEP_KEYS if k not in sweep]
    if lacking:
        raise ReportError(f"{path / 'sweep.json'}: missing {', '.join(lacking)}; it is not a `loralab sweep` "
                          "file (rerun the sweep to rewrite it)")
    if not isinstance(sweep["grid"], dict) or not isinstance(sweep["points"], list):
        raise ReportError(f"{path / 'sweep.json'}: 'grid' must be an object and 'points' a list")
    for i, point in enumerate(sweep["points"]):
        if not isinstance(point, dict) or not isinstance(point.get("overrides", {}), dict):
            raise ReportError(f"{path / 'sweep.json'}: point {i} is not an object with 'overrides'")
    runs: dict[str, RunData] = {}
    warnings: list[str] = []
    for point in sweep["points"]:
        for entry in point.get("runs") or []:
            run_dir = _resolve(path, str(entry))
            if not run_dir.is_dir():
                warnings.append(f"run dir {entry} is missing")
                continue
            try:
                runs[str(entry)] = read_run(run_dir, presets)
            except ReportError as err:
                warnings.append(str(err))
    md = (path / "sweep.md").read_text(encoding="utf-8") if (path / "sweep.md").is_file() else None
    return SweepData(path, sweep, runs, md, warnings)


def read_analysis(path: Path) -> AnalysisData:
    subspace = delta_w = None
    if (path / "subspace.json").is_file():
        subspace = _read_mapping(path / "subspace.json", "the subspace analysis")
        if not isinstance(subspace.get("modules"), dict):
            raise ReportError(f"{path / 'subspace.json'}: no 'modules' object; rerun `loralab analyze subspace`")
    if (path / "delta_w.json").is_file():
        delta_w = _read_mapping(path / "delta_w.json", "the ΔW analysis")
        if not isinstance(delta_w.get("modules"), dict):
            raise ReportError(f"{path / 'delta_w.json'}: no 'modules' object; rerun `loralab analyze delta-w`")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    return AnalysisData(path, subspace, delta_w, images)
