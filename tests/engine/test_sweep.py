"""`loralab sweep` and the plugin interface end to end: a new experiment written as one module outside
loralab (no file of loralab edited), trained, swept (resumable, killed and finished) and reported
through the CLI in real subprocesses."""

import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab.engine.sweep import _slug, parse_items, points, to_markdown
from loralab.engine.typed_config import ConfigError

TOY = Path(__file__).with_name("toy_experiment.py")
REPO = Path(__file__).resolve().parents[2]


def test_grid_parsing():
    fixed, grid = parse_items(["lora.r=1,2,4", "train.lr=1e-3", "lora.target_modules=[q,v],[q,k,v]",
                               "lora.modules_to_save=[classifier]"],
                              list_keys={"lora.target_modules", "lora.modules_to_save"})
    assert fixed == {"train.lr": "1e-3", "lora.modules_to_save": "[classifier]"}
    assert grid == {"lora.r": ["1", "2", "4"], "lora.target_modules": ["[q, v]", "[q, k, v]"]}
    assert len(points(grid)) == 6 and points(grid)[0] == {"lora.r": "1", "lora.target_modules": "[q, v]"}
    assert _slug({"lora.r": "4", "train.lr": "1e-3"}) == "lora.r-4_train.lr-1e-3"
    with pytest.raises(ConfigError, match="lists a value twice"):
        parse_items(["lora.r=1,1"], set())
    with pytest.raises(ConfigError, match="not key=value"):
        parse_items(["lora.r"], set())


def test_markdown_marks_rows_at_the_baseline():
    summary = {"preset": "p", "fixed": {}, "grid": {"lora.r": ["1", "8"]}, "main_metric": "accuracy",
               "points": [{"overrides": {"lora.r": "1"}, "scores": [0.5, 0.52], "learned": [False, False],
                           "score": 0.51, "spread": [0.5, 0.52], "baseline": 0.5},
                          {"overrides": {"lora.r": "8"}, "scores": [0.8, None], "learned": [True, None],
                           "score": 0.8, "spread": [0.8, 0.8], "baseline": 0.5}]}
    md = to_markdown(summary)
    assert "| 1 | 0.5100 | 0.5000–0.5200 | 2/2 | 0.5000 | 0/2 ✗ at baseline |" in md
    assert "| 8 | 0.8000 | 0.8000–0.8000 | 1/2 | 0.5000 | 1/1 |" in md


def _env(tmp_path: Path) -> dict:
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir(exist_ok=True)
    shutil.copy(TOY, plugin_dir / "toy_plugin.py")  # a module loralab has never heard of
    return {**os.environ, "LORALAB_EXPERIMENTS": "toy_plugin", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO / "src")])}


def _loralab(env, *argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "loralab", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=env["PYTHONPATH"].split(os.pathsep)[0])


@pytest.mark.slow
def test_a_plugin_experiment_trains_sweeps_resumes_and_reports_through_the_cli(tmp_path):
    env = _env(tmp_path)
    # trained
    done = _loralab(env, "train", "--preset", "toy-fit", f"out_dir={tmp_path / 'runs'}")
    assert done.returncode == 0, done.stderr
    assert "-> learned" in done.stdout
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    result = json.loads((run_dir / "results.json").read_text())
    assert result["experiment"] == "toy" and result["learned"] is True
    assert result["score"] < 0.05 * result["baseline"]["score"]  # mse far below the constant predictor's

    # swept: 2 learning rates x 2 seeds
    out = tmp_path / "sweep"
    argv = ["sweep", "--preset", "toy-fit", "train.lr=0.2,0.0001", "data.noise=0.2", "--seeds", "0,1", "--jobs", "2",
            "--out", str(out)]
    first = _loralab(env, *argv)
    assert first.returncode == 0, first.stderr + first.stdout
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["grid"] == {"train.lr": ["0.2", "0.0001"]} and summary["fixed"] == {"data.noise": "0.2"}
    assert summary["main_metric"] == "mse" and summary["greater_is_better"] is False
    fast, slow = summary["points"]
    for point in (fast, slow):
        assert point["status"] == ["completed", "completed"]
        runs = [json.loads((out / r / "results.json").read_text()) for r in point["runs"]]
        assert point["scores"] == [r["score"] for r in runs]
        assert point["score"] == statistics.median(point["scores"])
        assert point["spread"] == [min(point["scores"]), max(point["scores"])]
        assert [r["run"]["seed"] for r in runs] == [0, 1]
    assert fast["baselines"] == slow["baselines"]  # measured once per seed, shared by both learning rates
    assert len(list((out / "baselines").glob("*.json"))) == 2
    assert fast["learned"] == [True, True]
    assert slow["learned"] == [False, False]  # lr 1e-4 for 64 steps does not leave the baseline
    md = (out / "sweep.md").read_text()
    assert "| 0.2 |" in md and "0/2 ✗ at baseline" in md

    # rerun: every run skipped, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}
    again = _loralab(env, *argv)
    assert again.returncode == 0 and again.stdout.count("completed earlier: skipped") == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}
    different = _loralab(env, "sweep", "--preset", "toy-fit", "train.lr=0.05", "--out", str(out))
    assert different.returncode == 2 and "holds another sweep" in different.stderr

    # reported
    report = _loralab(env, "report", str(out), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "index.html").stat().st_size > 0


@pytest.mark.slow
def test_a_killed_sweep_finishes_the_remaining_runs_when_rerun(tmp_path):
    env = _env(tmp_path)
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "loralab", "sweep", "--preset", "toy-fit", "train.lr=0.05,0.02,0.01",
            "--seeds", "0", "--out", str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=env["PYTHONPATH"].split(os.pathsep)[0])
    from loralab.engine.runs import list_runs

    def registered_complete() -> set[str]:
        # a run counts as finished once the registry says so: results.json is written a moment earlier,
        # and a kill in between rightly leaves that run to be redone
        if not (out / "runs").is_dir():
            return set()
        try:
            return {r.dir.name for r in list_runs(out / "runs") if r.status == "completed"}
        except (OSError, ValueError, sqlite3.Error):  # the registry is being written
            return set()

    deadline = time.time() + 240
    while time.time() < deadline and not registered_complete():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it is in the middle of
    proc.wait()
    finished_before = registered_complete()
    assert 1 <= len(finished_before) < 3
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300,
                           cwd=env["PYTHONPATH"].split(os.pathsep)[0])
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    summary = json.loads((out / "sweep.json").read_text())
    assert all(p["status"] == ["completed"] for p in summary["points"])
    skipped = {line.split()[1] for line in rerun.stdout.splitlines() if "completed earlier: skipped" in line}
    assert skipped == finished_before  # what had finished was not run again
    rows = list_runs(out / "runs")
    assert sorted(r.status for r in rows) == ["completed"] * 3  # one registry row per run, none left behind


def test_reference_table_deviation_is_the_formula():
    from loralab.engine.sweep import reference_markdown

    summary = {"points": [{"overrides": {"lora.r": "4"}, "metrics": {"BLEU": 0.5, "NIST": 7.0}},
                          {"overrides": {"lora.r": "16"}, "metrics": {"BLEU": 0.6}}],
               "reference": {"label": "Table X", "key": "lora.r", "metrics": {"BLEU": 100.0, "NIST": 1.0},
                             "rows": {"4": {"BLEU": 70.38, "NIST": 8.8439}}, "note": "why"}}
    lines = reference_markdown(summary)
    assert "## Beside Table X" in lines and lines[-1] == "why"
    dev_bleu, dev_nist = 100 * (50 - 70.38) / 70.38, 100 * (7 - 8.8439) / 8.8439
    assert f"| 4 | 50 | 70.38 | {dev_bleu:+.1f} | 7 | 8.844 | {dev_nist:+.1f} |" in lines
    assert "| 16 | 60 | — | — | — | — | — |" in lines  # no paper row, no metric: shown as such
    assert reference_markdown({"points": [], "reference": None}) == []


def test_named_sweeps_and_their_paper_numbers():
    from loralab.engine.config import ConfigError
    from loralab.engine.sweep import named_sweeps, resolve_named
    from loralab.tasks.e2e.presets import PAPER_RANK_TABLE

    sweeps = named_sweeps()
    assert {"e2e-rank", "glue-rank-sst2", "glue-rank-rte"} <= set(sweeps)
    e2e = sweeps["e2e-rank"]
    assert e2e["grid"]["lora.r"] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert set(e2e["reference"]["rows"]) == {str(r) for r in e2e["grid"]["lora.r"]}
    # the paper's caption: "performance peaks at r = 16 for validation loss and r = 4 for BLEU"
    assert max(PAPER_RANK_TABLE, key=lambda r: PAPER_RANK_TABLE[r]["BLEU"]) == "4"
    assert min(PAPER_RANK_TABLE, key=lambda r: (PAPER_RANK_TABLE[r]["eval_loss"], int(r))) == "16"
    preset, items, seeds, ref = resolve_named("glue-rank-sst2", ["lora.r=2,8", "train.lr=1e-3"], None)
    assert preset == "glue-cpu-sst2" and seeds == [0, 1, 2] and ref["key"] == "lora.r"
    assert items == ["lora.r=2,8", "train.lr=1e-3"]  # the user's grid replaces the sweep's
    assert resolve_named("e2e-rank", [], [5])[1:3] == (["lora.r=1,2,4,8,16,32,64,128,256,512,1024",
                                                         "model.compute_dtype=auto"], [5])
    with pytest.raises(ConfigError, match="did you mean 'e2e-rank'"):
        resolve_named("e2e-rnak", [], None)


@pytest.mark.parametrize("name", ["e2e-rank", "glue-rank-sst2", "glue-rank-rte", "glue-rank-mrpc"])
def test_every_named_sweeps_reference_renders_beside_a_point(name):
    # the GLUE sweeps once crashed here before their first run: rows were bare numbers, not {metric: value}
    from loralab.engine.sweep import named_sweeps, reference_markdown

    ref = named_sweeps()[name]["reference"]
    r, paper = next(iter(ref["rows"].items()))
    metric, scale = next(iter(ref["metrics"].items()))
    ours = 0.9 * paper[metric] / scale
    lines = reference_markdown({"points": [{"overrides": {ref["key"]: r}, "metrics": {metric: ours}}],
                                "reference": ref})
    row = next(line for line in lines if line.startswith(f"| {r} |"))
    assert row.strip("| ").split(" | ")[1:4] == [f"{ours * scale:.4g}", f"{paper[metric]:.4g}", "-10.0"]


@pytest.mark.slow
def test_a_named_sweep_runs_and_prints_the_paper_beside_it(tmp_path):
    env = _env(tmp_path)
    out = tmp_path / "named"
    done = _loralab(env, "sweep", "--sweep", "toy-lr", "--out", str(out))
    assert done.returncode == 0, done.stderr + done.stdout
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["preset"] == "toy-fit" and summary["seeds"] == [0] and summary["fixed"] == {"data.noise": "0.2"}
    fast = summary["points"][0]
    ours = json.loads((out / fast["runs"][0] / "results.json").read_text())["metrics"]["mse"]
    assert fast["metrics"] == {"mse": ours}
    assert f"| 0.2 | {10 * ours:.4g} | 0.5 | {100 * (10 * ours - 0.5) / 0.5:+.1f} |" in done.stdout
    both = _loralab(env, "sweep", "--sweep", "toy-lr", "--preset", "toy-fit", "--out", str(out))
    assert both.returncode == 2 and "not both" in both.stderr
