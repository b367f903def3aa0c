"""Run dirs and the SQLite registry: create, log, finish/fail, lookup, compare, concurrency."""

import importlib.metadata
import json
import math
import platform
import re
import socket
import sqlite3
import subprocess
import threading
import uuid

import pytest
import torch

from loralab.engine import runs as R
from loralab.engine.config import load_config
from loralab.engine.runs import compare_runs, create_run, get_run, list_runs, open_run


def _cfg(*overrides):
    if not any(o.startswith("experiment=") for o in overrides):
        overrides = ("experiment=glue", *overrides)  # a config needs its experiment (any will do here)
    return load_config(None, list(overrides))


def test_create_run_layout_config_env_and_registry(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "f.txt").write_text("x")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)

    cfg = _cfg("name=My Run/1", "train.lr=1e-3", "model.name=smollm2-135m", "experiment=e2e")
    run = create_run(cfg, tmp_path / "runs")
    assert run.dir.parent == tmp_path / "runs"
    assert re.fullmatch(r"\d{8}-\d{6}-My-Run-1-[0-9a-f]{8}", run.dir.name), run.dir.name
    assert run.dir.name.endswith(run.id[:8]) and len(run.id) == 32
    assert load_config(run.dir / "config.yaml") == cfg

    env = json.loads((run.dir / "env.json").read_text())
    assert env["python"] == platform.python_version()
    assert env["packages"]["torch"] == importlib.metadata.version("torch")
    assert env["packages"]["peft"] == importlib.metadata.version("peft")
    assert env["hostname"] == socket.gethostname()
    assert env["git"] == {"commit": head, "dirty": False}
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0))

    # The registry row, read with plain sqlite3 (not through our own reader).
    con = sqlite3.connect(tmp_path / "runs" / "runs.sqlite")
    row = con.execute("SELECT id, name, experiment, model, task, status, dir FROM runs").fetchone()
    con.close()
    assert row == (run.id, "My Run/1", "e2e", "smollm2-135m", "e2e", "running", run.dir.name)


def test_git_commit_absent_outside_a_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert R.environment()["git"] == {"commit": None}


def test_log_metrics_finish_and_fail(tmp_path):
    run = create_run(_cfg(), tmp_path)
    run.log_metrics(1, {"loss": torch.tensor(0.5), "lr": 1e-4})
    run.log_metrics(2, {"loss": float("nan"), "grad_norm": torch.tensor([1.0, 2.0])})
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert (first["step"], first["loss"], first["lr"]) == (1, 0.5, 1e-4)
    assert math.isnan(second["loss"]) and second["grad_norm"] == [1.0, 2.0]

    results = {"eval": {"accuracy": 0.75, "f1": 0.5}, "method": "lora", "history": [1, 2], "n": 3}
    run.finish(results)
    assert json.loads((run.dir / "results.json").read_text()) == results
    assert not (run.dir / "results.json.tmp").exists()
    record = get_run(tmp_path, run.id)
    assert record.status == "completed" and record.finished
    assert record.metrics == {"eval.accuracy": 0.75, "eval.f1": 0.5, "method": "lora", "n": 3}

    other = create_run(_cfg(), tmp_path)
    other.fail("Traceback ...\nRuntimeError: boom")
    record = get_run(tmp_path, other.id)
    assert record.status == "failed" and record.error.endswith("boom")
    assert (other.dir / "error.txt").read_text() == "Traceback ...\nRuntimeError: boom\n"
    reopened = open_run(other.dir)
    assert reopened.id == other.id
    reopened.mark_running()
    assert get_run(tmp_path, other.id).status == "running" and get_run(tmp_path, other.id).error is None


def test_a_killed_run_reads_as_interrupted_and_a_live_one_as_running(tmp_path):
    import sys

    # a process that registers a run and is then killed outright: it never updates its row
    code = ("import os, signal; from loralab.engine.config import load_config; from loralab.engine.runs import create_run; "
            f"create_run(load_config(None, ['experiment=glue']), {str(tmp_path)!r}); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    (killed,) = list_runs(tmp_path)
    assert killed.status == "interrupted (process gone)"
    live = create_run(_cfg(), tmp_path)  # this process: alive
    assert get_run(tmp_path, live.id).status == "running"
    assert json.loads((live.dir / "running.json").read_text())["host"] == socket.gethostname()
    live.finish({"score": 1.0})
    assert get_run(tmp_path, live.id).status == "completed" and not (live.dir / "running.json").exists()
    assert sqlite3.connect(tmp_path / "runs.sqlite").execute(  # the registry itself is not rewritten
        "SELECT status FROM runs WHERE id = ?", (killed.id,)).fetchone() == ("running",)
    open_run(killed.dir).mark_running()  # resuming a dead run takes it over
    assert get_run(tmp_path, killed.id).status == "running"


def test_resume_is_refused_while_another_live_process_runs_it(tmp_path):
    run = create_run(_cfg(), tmp_path)
    other = subprocess.Popen(["sleep", "30"])
    try:
        owner = json.loads((run.dir / "running.json").read_text())
        (run.dir / "running.json").write_text(json.dumps({**owner, "pid": other.pid}))
        with pytest.raises(R.RunBusyError, match=f"still being run by process {other.pid}"):
            open_run(run.dir).mark_running()
    finally:
        other.kill()
        other.wait()
    open_run(run.dir).mark_running()  # its owner is gone now


def test_get_run_by_prefix_dir_name_and_errors(tmp_path, monkeypatch):
    ids = iter([uuid.UUID("abcd0000" + "0" * 24), uuid.UUID("abcd1111" + "1" * 24), uuid.UUID("ef" + "2" * 30)])
    monkeypatch.setattr(R.uuid, "uuid4", lambda: next(ids))
    a, b, c = (create_run(_cfg(f"name=r{i}"), tmp_path) for i in range(3))
    assert get_run(tmp_path, "abcd0").id == a.id
    assert get_run(tmp_path, "ef").id == c.id
    assert get_run(tmp_path, b.dir.name).id == b.id
    assert get_run(tmp_path, str(b.dir)).id == b.id
    with pytest.raises(KeyError, match="ambiguous"):
        get_run(tmp_path, "abcd")
    with pytest.raises(KeyError, match="no run 'zz'"):
        get_run(tmp_path, "zz")
    assert [r.name for r in list_runs(tmp_path)] == ["r0", "r1", "r2"]
    assert list_runs(tmp_path / "nothing") == []


def test_compare_runs_union_of_results_and_config_differences(tmp_path):
    a = create_run(_cfg("name=a", "train.lr=1e-3"), tmp_path)
    b = create_run(_cfg("name=b", "train.lr=2e-4", "lora.r=16"), tmp_path)
    a.finish({"accuracy": 0.8125, "loss": 0.5})
    b.finish({"accuracy": 0.9, "f1": 0.25})
    table = compare_runs(tmp_path, [a.id[:8], b.id[:8]])
    metric_part, config_part = table.split("config differences:")
    header = metric_part.splitlines()[0].split()
    assert header == ["id", "name", "status", "accuracy", "loss", "f1"]
    row_a = metric_part.splitlines()[2].split()
    row_b = metric_part.splitlines()[3].split()
    assert row_a == [a.id[:8], "a", "completed", "0.8125", "0.5", "-"]
    assert row_b == [b.id[:8], "b", "completed", "0.9", "-", "0.25"]
    diff_keys = [line.split()[0] for line in config_part.strip().splitlines()[2:]]
    assert diff_keys == ["name", "lora.r", "train.lr"]
    lr_row = next(line for line in config_part.splitlines() if line.startswith("train.lr"))
    assert lr_row.split() == ["train.lr", "0.001", "0.0002"]


def test_concurrent_runs_all_registered(tmp_path):
    errors = []

    def work(i):
        try:
            for j in range(3):
                run = create_run(_cfg(f"name=t{i}-{j}"), tmp_path)
                run.log_metrics(0, {"x": i})
                run.finish({"score": float(i * 10 + j)})
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    records = list_runs(tmp_path)
    assert sorted(r.metrics["score"] for r in records) == sorted(float(i * 10 + j) for i in range(4) for j in range(3))
    assert all(r.status == "completed" for r in records)
    assert len({r.dir for r in records}) == 12
