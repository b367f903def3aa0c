"""Run directories and the run registry (``<root>/runs.sqlite``, stdlib sqlite3).

A run dir ``<root>/<YYYYmmdd-HHMMSS>-<name>-<id8>/`` holds:
``config.yaml`` (the resolved config), ``env.json`` (versions, git commit, device, host),
``metrics.jsonl`` (one JSON object per logged step), ``results.json`` (written atomically at the end),
``error.txt`` (when the run failed), and ``running.json`` (pid, host, boot id) while a process runs it.
The registry row records status and headline metrics so that ``loralab runs list|show|compare`` need
not open every directory. A process killed outright (SIGKILL, OOM, power loss) cannot update its row:
a "running" row whose process is gone on this host is reported as "interrupted (process gone)".
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from loralab.engine.config import RunConfig, save_config

REGISTRY = "runs.sqlite"
_SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, experiment TEXT, model TEXT, task TEXT, status TEXT,
    created TEXT, finished TEXT, dir TEXT, metrics TEXT, error TEXT)"""
_PACKAGES = ("loralab", "torch", "transformers", "peft", "bitsandbytes", "safetensors", "numpy", "accelerate")


@dataclass
class RunRecord:
    """One registry row. ``dir`` is absolute (the registry stores it relative to the root)."""

    id: str
    name: str
    experiment: str
    model: str
    task: str
    status: str
    created: str
    finished: str | None
    dir: Path
    metrics: dict[str, Any]
    error: str | None


class RegistryError(Exception):
    """``runs.sqlite`` cannot be read or written (corrupt, not a database, disk full, read-only)."""


class RunNotFound(KeyError):
    """No run of that id, prefix or dir in the registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RunBusyError(Exception):
    """Another live process on this host runs this run: it is not taken over."""


@contextmanager
def _registry(root: Path):
    """A connection to ``<root>/runs.sqlite`` (committed and closed on exit); any sqlite failure becomes a
    ``RegistryError`` that names the file and the way out."""
    path = Path(root) / REGISTRY
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=60.0)  # waits on other writers instead of failing
    except sqlite3.Error as err:
        raise RegistryError(f"cannot open the run registry {path}: {err}") from None
    try:
        # PERSIST keeps the rollback journal file allocated between writes, so a small update (a run marked
        # failed) still fits when the disk has filled up since
        con.execute("PRAGMA journal_mode=PERSIST")
        with con:
            con.execute(_SCHEMA)
            yield con
    except sqlite3.DatabaseError as err:
        hint = ("free disk space and retry" if "full" in str(err) else
                f"move it away (e.g. mv {path} {path}.broken) and the next run starts a new registry; "
                "the run dirs beside it are untouched")
        raise RegistryError(f"the run registry {path} is unusable ({err}): {hint}") from None
    finally:
        con.close()


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers; containers are converted recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def headline(results: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar entries of ``results`` flattened to dotted keys ({"eval": {"acc": 0.9}} -> {"eval.acc": 0.9})."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(headline(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[f"{prefix}{key}"] = value
    return flat


def _git_commit(cwd: Path) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=30)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def environment() -> dict[str, Any]:
    """What produced a run: versions, git commit of the cwd repo, device, threads, host, platform."""
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    env: dict[str, Any] = {
        "python": sys.version.split()[0], "packages": versions, "git": _git_commit(Path.cwd()),
        "hostname": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "argv": sys.argv, "cwd": str(Path.cwd()),
    }
    try:
        import torch  # lazily: `loralab runs list` should not pay for torch

        env["torch_threads"] = torch.get_num_threads()
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        env["cuda"] = torch.version.cuda
    except ImportError:
        env["device"] = None
    return env


class Run:
    """A live run: its directory, its metrics log and its registry row."""

    def __init__(self, root: Path, run_id: str, run_dir: Path):
        self.root, self.id, self.dir = Path(root), run_id, Path(run_dir)

    def __repr__(self) -> str:
        return f"Run(id={self.id[:8]!r}, dir={str(self.dir)!r})"

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append ``{"step": step, "time": unix seconds, **metrics}`` as one line of metrics.jsonl.
        Non-finite floats are written as NaN / Infinity (Python's json reads them back)."""
        record = {"step": int(step), "time": round(time.time(), 3), **_jsonable(metrics)}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def _update(self, **columns: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in columns)
        with _registry(self.root) as con:
            con.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*columns.values(), self.id))

    def finish(self, results: dict[str, Any], status: str = "completed") -> Path:
        """Write results.json atomically (tmp + os.replace) and record status and headline metrics."""
        results = _jsonable(results)
        path = self.dir / "results.json"
        tmp = self.dir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        self._update(status=status, finished=_now(), metrics=json.dumps(headline(results)))
        (self.dir / OWNER).unlink(missing_ok=True)
        return path

    def fail(self, message: str, status: str = "failed") -> None:
        """Record a failed (or ``status="interrupted"``) run: the registry row first (small: it survives a
        full disk more often than a file does), then error.txt and the owner file, each best effort, so
        that one failing write (disk full) does not leave the run looking alive."""
        errors = []
        for write in (lambda: self._update(status=status, finished=_now()),  # the row keeps its size
                      lambda: self._update(error=message[-2000:]),
                      lambda: (self.dir / "error.txt").write_text(message.rstrip() + "\n"),
                      lambda: (self.dir / OWNER).unlink(missing_ok=True)):
            try:
                write()
            except (OSError, RegistryError) as err:
                errors.append(err)
        if errors:
            print(f"loralab: could not record the failure of run {self.id[:8]} completely: "
                  + "; ".join(map(str, errors)), file=sys.stderr)

    def mark_running(self) -> None:
        """Take the run over (resume); refused while another live process on this host still runs it."""
        owner = _live_owner(self.dir)
        if owner is not None and owner != os.getpid():
            raise RunBusyError(f"run {self.id[:8]} ({self.dir}) is still being run by process {owner} on this host; "
                               "wait for it to end or stop it first (two writers would corrupt its checkpoints); "
                               "nothing of the run was changed")
        self._update(status="running", finished=None, error=None)
        _write_owner(self.dir)


OWNER = "running.json"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _write_owner(run_dir: Path) -> None:
    """Who runs this run dir now: read back by ``list_runs`` to tell a live run from a killed one."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id()}
    (run_dir / OWNER).write_text(json.dumps(owner) + "\n")


def _owner_state(run_dir: Path) -> tuple[str, int | None]:
    """("gone" | "alive" | "unknown", pid) of the process recorded in running.json."""
    try:
        owner = json.loads((run_dir / OWNER).read_text())
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown", None  # no owner file (older run, or another tool): leave the status as recorded
    if owner.get("host") != socket.gethostname():
        return "unknown", pid
    if owner.get("boot_id") and _boot_id() and owner["boot_id"] != _boot_id():
        return "gone", pid  # the machine rebooted since
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone", pid
    except PermissionError:
        return "alive", pid
    return "alive", pid


def _process_gone(run_dir: Path) -> bool:
    return _owner_state(run_dir)[0] == "gone"


def _live_owner(run_dir: Path) -> int | None:
    state, pid = _owner_state(run_dir)
    return pid if state == "alive" else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60] or "run"


def create_run(cfg: RunConfig, root: str | Path | None = None, run_dir: str | Path | None = None) -> Run:
    """Make ``<root>/<timestamp>-<name>-<id8>/`` (or the given ``run_dir``, whose parent is then the
    root) with config.yaml and env.json, and register it."""
    run_id = uuid.uuid4().hex
    created = _now()
    if run_dir is not None:
        run_dir = Path(run_dir).resolve()
        root = run_dir.parent
    else:
        root = Path(root if root is not None else cfg.out_dir)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = root / f"{stamp}-{_slug(cfg.run_name)}-{run_id[:8]}"
    with _registry(root) as con:  # an unusable registry fails before the run dir exists
        run_dir.mkdir(parents=True, exist_ok=False)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "env.json").write_text(json.dumps(environment(), indent=2) + "\n")
        con.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, cfg.run_name, cfg.experiment, cfg.model.name, cfg.task_label, "running", created,
                     None, run_dir.name, "{}", None))
    _write_owner(run_dir)
    return Run(root, run_id, run_dir)


def _record(root: Path, row: tuple) -> RunRecord:
    rid, name, experiment, model, task, status, created, finished, rel_dir, metrics, error = row
    if status == "running" and _process_gone(root / rel_dir):
        status = "interrupted (process gone)"
    return RunRecord(rid, name, experiment, model, task, status, created, finished, root / rel_dir,
                     json.loads(metrics or "{}"), error)


def list_runs(root: str | Path) -> list[RunRecord]:
    """All registered runs, oldest first (an absent registry is an empty list)."""
    root = Path(root)
    if not (root / REGISTRY).exists():
        return []
    with _registry(root) as con:
        rows = con.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
    return [_record(root, row) for row in rows]


def get_run(root: str | Path, id_or_prefix: str) -> RunRecord:
    """The run whose id (or dir name) starts with ``id_or_prefix``; a run dir path works too."""
    root = Path(root)
    key = Path(id_or_prefix).name if os.sep in id_or_prefix else id_or_prefix
    runs = list_runs(root)
    matches = [r for r in runs if r.id.startswith(key) or r.dir.name == key]
    if not matches:
        matches = [r for r in runs if r.dir.name.startswith(key)]
    if not matches:
        raise RunNotFound(f"no run {id_or_prefix!r} in {root / REGISTRY} ({len(runs)} runs; see `loralab runs list "
                          f"--root {root}`)")
    if len(matches) > 1:
        names = ", ".join(f"{r.id[:8]} ({r.name})" for r in matches[:5])
        raise RunNotFound(f"run id prefix {id_or_prefix!r} is ambiguous: {names}; give more characters")
    return matches[0]


def open_run(run_dir: str | Path) -> Run:
    """The ``Run`` of an existing run dir (to resume it): its registry is the parent dir's."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run dir (no config.yaml)")
    try:
        record = get_run(run_dir.parent, run_dir.name)
    except RunNotFound:
        raise RunNotFound(f"{run_dir} is not in the run registry {run_dir.parent / REGISTRY} (a copied or moved "
                          "run dir?): resume it where it was created, or start a new run with its config.yaml "
                          f"(loralab train {run_dir / 'config.yaml'})") from None
    return Run(run_dir.parent, record.id, run_dir)


def _flat_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    return headline(yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value) if not isinstance(value, (list, dict)) else json.dumps(value)


def format_table(header: list[str], rows: Iterable[list[Any]]) -> str:
    """Plain text table, columns left-aligned and padded to the widest cell."""
    body = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def compare_runs(root: str | Path, ids: list[str]) -> str:
    """Side-by-side table: one row per run, the union of result keys as columns; then the config
    keys whose values differ between the runs (one row per key, one column per run)."""
    records = [get_run(root, i) for i in ids]
    metric_keys: list[str] = []
    for r in records:
        metric_keys += [k for k in r.metrics if k not in metric_keys]
    out = [format_table(["id", "name", "status", *metric_keys],
                        [[r.id[:8], r.name, r.status, *(r.metrics.get(k) for k in metric_keys)] for r in records])]
    configs = [_flat_config(r.dir) for r in records]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differing = [k for k in keys
                 if len({json.dumps(c.get(k, "<absent>"), default=str, sort_keys=True) for c in configs}) > 1]
    if differing:
        out += ["", "config differences:",
                format_table(["key", *(r.id[:8] for r in records)], [[k, *(c.get(k) for c in configs)] for k in differing])]
    else:
        out += ["", "configs identical"]
    return "\n".join(out)
