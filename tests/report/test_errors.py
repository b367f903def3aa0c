"""Bad input: one line `loralab report: error: <path and fix>` on stderr and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report draws with matplotlib (pip install matplotlib)")

from loralab.report.commands import main

from .conftest import make_analysis, make_sweep


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab report: error: ") and err.count("\n") == 1, err
    return err


def test_missing_path(capsys, tmp_path):
    err = _fails(capsys, str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert str(tmp_path / "nope") in err and "no such directory" in err


def test_a_file_instead_of_its_directory(capsys, tmp_path, run_dir):
    err = _fails(capsys, str(run_dir / "results.json"), "--out", str(tmp_path / "o"))
    assert "not a directory" in err and str(run_dir) in err


def test_a_directory_of_runs_names_one_of_them(capsys, tmp_path, run_dir):
    err = _fails(capsys, str(run_dir.parent), "--out", str(tmp_path / "o"))
    assert "not a run, sweep or analysis directory" in err and "holds 1 run dirs" in err and str(run_dir) in err


def test_bad_results_json(capsys, tmp_path, run_dir):
    (run_dir / "results.json").write_text("{\"score\": ")
    err = _fails(capsys, str(run_dir), "--out", str(tmp_path / "o"))
    assert str(run_dir / "results.json") in err and "not valid JSON" in err
    (run_dir / "results.json").write_text("[1, 2]")
    assert "expected a JSON object" in _fails(capsys, str(run_dir), "--out", str(tmp_path / "o"))


def test_sweep_without_grid(capsys, tmp_path):
    sweep = make_sweep(tmp_path)
    data = json.loads((sweep / "sweep.json").read_text())
    del data["grid"]
    (sweep / "sweep.json").write_text(json.dumps(data))
    err = _fails(capsys, str(sweep), "--out", str(tmp_path / "o"))
    assert str(sweep / "sweep.json") in err and "missing grid" in err


def test_ragged_phi(capsys, tmp_path):
    analysis = make_analysis(tmp_path, delta_w=False)
    data = json.loads((analysis / "subspace.json").read_text())
    first = next(iter(data["modules"].values()))
    first["phi"][1] = first["phi"][1][:-1]
    (analysis / "subspace.json").write_text(json.dumps(data))
    err = _fails(capsys, str(analysis), "--out", str(tmp_path / "o"))
    assert "phi: rows of different lengths" in err and "subspace.json" in err


def test_out_is_a_file(capsys, tmp_path, run_dir):
    (tmp_path / "o").write_text("x")
    assert "--out exists and is not a directory" in _fails(capsys, str(run_dir), "--out", str(tmp_path / "o"))


def test_missing_out_is_a_usage_error(capsys, run_dir):
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir)])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


def test_the_report_package_imports_neither_torch_nor_matplotlib_at_import():
    code = ("import sys; import loralab.report.commands\n"
            "print(' '.join(m for m in ('torch', 'transformers', 'matplotlib', 'loralab.engine') if m in sys.modules))")
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == ""


def test_without_matplotlib_the_error_says_how_to_install_it(capsys, monkeypatch, tmp_path, run_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert "pip install matplotlib" in _fails(capsys, str(run_dir), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
