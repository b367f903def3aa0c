"""``loralab analyze``: both subcommands end to end, and bad input as one error line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loralab.analysis.commands import main

from .conftest import write_adapter, write_base

G = torch.Generator().manual_seed(0)


def factors(r: int, names=("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")):
    return {n: (torch.randn(r, 16, generator=G), torch.randn(16, r, generator=G)) for n in names}


def call(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loralab analyze: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_subspace_command(tmp_path, capsys):
    a = write_adapter(tmp_path / "r8", factors(8), r=8)
    b = write_adapter(tmp_path / "r64", factors(16), r=16)
    code, out, err = call(capsys, "subspace", a, b, "--modules", "layers\\.1\\.", "--out", tmp_path / "o", "--no-plots")
    assert code == 0, err
    res = json.loads((tmp_path / "o" / "subspace.json").read_text())
    assert list(res["modules"]) == ["model.layers.1.self_attn.q_proj"] and "phi(1,1)" in out
    assert len(res["modules"]["model.layers.1.self_attn.q_proj"]["phi"]) == 8
    code, _, err = call(capsys, "subspace", a, b, "--use", "B", "--out", tmp_path / "oB", "--seed", 3, "--no-plots")
    assert code == 0 and json.loads((tmp_path / "oB" / "subspace.json").read_text())["use"] == "B"


def test_delta_w_command(tmp_path, capsys):
    f = factors(4)
    a = write_adapter(tmp_path / "ad", f, r=4, lora_alpha=8)
    base = write_base(tmp_path / "base", {n + ".weight": torch.randn(16, 16, generator=G) for n in f})
    code, out, err = call(capsys, "delta-w", a, "--base", base, "--out", tmp_path / "o", "--n-random", 2)
    assert code == 0, err
    assert "| `model.layers.0.self_attn.q_proj` | 4 | 4 |" in out
    res = json.loads((tmp_path / "o" / "delta_w.json").read_text())
    assert set(res["modules"]) == set(f) and res["n_random"] == 2
    assert (tmp_path / "o" / "delta_w.md").exists()


def test_errors_are_one_line(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", factors(4), r=4)
    other = write_adapter(tmp_path / "b", factors(4, names=("encoder.layer.0.query",)), r=4)
    out = tmp_path / "o"
    assert_one_error_line(*call(capsys, "subspace", tmp_path / "nope", a, "--out", out)[::2], "nope", "not a directory")
    assert_one_error_line(*call(capsys, "subspace", a, other, "--out", out)[::2], "no module is adapted in both")
    assert_one_error_line(*call(capsys, "subspace", a, a, "--modules", "zzz", "--out", out)[::2], "--modules")
    corrupt = write_adapter(tmp_path / "c", factors(4), r=4)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_one_error_line(*call(capsys, "subspace", a, corrupt, "--out", out)[::2], "adapter_model.safetensors",
                          "corrupt")
    badcfg = write_adapter(tmp_path / "d", factors(4), r=4)
    (badcfg / "adapter_config.json").write_text("{")
    assert_one_error_line(*call(capsys, "subspace", a, badcfg, "--out", out)[::2], "adapter_config.json", "JSON")
    nan = write_adapter(tmp_path / "n", {n: (A * float("nan"), B) for n, (A, B) in factors(4).items()}, r=4)
    assert_one_error_line(*call(capsys, "subspace", a, nan, "--out", out)[::2], "NaN")
    (tmp_path / "empty").mkdir()
    assert_one_error_line(*call(capsys, "subspace", a, tmp_path / "empty", "--out", out)[::2], "no adapter_config.json")
    base = write_base(tmp_path / "base", {"lm_head.weight": torch.zeros(3, 3)})
    assert_one_error_line(*call(capsys, "delta-w", a, "--base", base, "--out", out)[::2], "no weight for module",
                          str(base))
    assert_one_error_line(*call(capsys, "delta-w", a, "--base", tmp_path / "nobase", "--out", out)[::2], "--base")


def test_usage_errors_and_help(capsys):
    code, _, err = call(capsys, "subspace", "x")
    assert code == 2 and "usage: loralab analyze subspace" in err and "Traceback" not in err
    assert call(capsys, "delta-w", "x", "--out", "o")[0] == 2  # --base is required
    code, out, _ = call(capsys, "--help")
    assert code == 0 and "usage: loralab analyze" in out and "delta-w" in out


def test_package_imports_no_transformers_engine_tasks_or_matplotlib():
    code = ("import sys, loralab.analysis.commands, loralab.analysis.subspace, loralab.analysis.delta_w, "
            "loralab.analysis.plots; print('\\n'.join(sys.modules))")
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    bad = {m for m in mods if m.split(".")[0] in ("transformers", "matplotlib")
           or m.startswith(("loralab.engine", "loralab.tasks"))}
    assert not bad, sorted(bad)


@pytest.mark.parametrize("argv", [["subspace", "--help"], ["delta-w", "--help"], ["sweep", "--help"],
                                  ["ranks", "--help"]])
def test_subcommand_help(capsys, argv):
    code, out, _ = call(capsys, *argv)
    assert code == 0 and "--out" in out
