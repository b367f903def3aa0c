"""`loralab analyze sweep` and `analyze ranks`: the pairs chosen from a sweep, their numbers against direct
float64 computations, the saturation rank by hand, and the commands' outputs and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loralab.analysis.adapters import AnalysisError
from loralab.analysis.commands import main
from loralab.analysis.sweeps import analyze_sweep, rank_curves, sweep_adapters

from .conftest import orthonormal, write_adapter, write_base

IN, OUT = 16, 10
NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")


def _factors(r: int, seed: int, top: torch.Tensor | None = None):
    """A = r orthonormal input directions scaled 5, 4, ... (the first one ``top`` when given), B random."""
    q = orthonormal(IN, r, 100 + seed * 31 + r)
    if top is not None:  # plant a shared top direction: orthogonalise the rest against it
        q = torch.linalg.qr(torch.cat([top[:, None], q[:, : r - 1]], dim=1))[0]
        q[:, 0] = top
    A = (q * torch.linspace(5, 1, r, dtype=torch.float64)).T
    g = torch.Generator().manual_seed(seed * 7 + r)
    return {n: (A.clone(), torch.randn(OUT, r, generator=g, dtype=torch.float64)) for n in NAMES}


def write_sweep(root, cells, scores=None, statuses=None):
    """A sweep dir: cells = {(rank, seed): factors}; runs/r<r>-s<seed>/{adapter, results.json}."""
    ranks = sorted({r for r, _ in cells})
    seeds = sorted({s for _, s in cells})
    points = []
    for r in ranks:
        runs, status, sc = [], [], []
        for s in seeds:
            rel = f"runs/r{r}-s{s}"
            runs.append(rel)
            done = (r, s) in cells and (statuses or {}).get((r, s), "completed") == "completed"
            status.append("completed" if done else "missing")
            sc.append((scores or {}).get((r, s)))
            if (r, s) in cells:
                write_adapter(root / rel / "adapter", cells[r, s], r=r, lora_alpha=2 * r)
                (root / rel / "results.json").write_text(json.dumps({"run": {"seed": s, "model": "toy"}, "details": {}}))
        done = [x for x in sc if x is not None]
        points.append({"overrides": {"lora.r": str(r)}, "runs": runs, "status": status, "scores": sc,
                       "score": float(np.median(done)) if done else None,
                       "spread": [min(done), max(done)] if done else None, "baseline": 0.5})
    (root / "sweep.json").write_text(json.dumps({"grid": {"lora.r": [str(r) for r in ranks]}, "seeds": seeds,
                                                 "points": points, "main_metric": "accuracy",
                                                 "greater_is_better": True}))
    return root


def _top_right(A: torch.Tensor, i: int) -> np.ndarray:
    return np.linalg.svd(np.asarray(A, dtype=np.float64))[2][:i].T


def test_pairs_are_the_papers_and_phi_is_the_formula(tmp_path):
    top = orthonormal(IN, 1, 7)[:, 0]
    cells = {(2, 0): _factors(2, 0), (8, 0): _factors(8, 0, top), (8, 1): _factors(8, 1)}
    # r = 64 > in = 16: only 16 directions exist; lora_A's other rows are zero (those phi rows are null)
    full = _factors(IN, 0, top)
    cells[64, 0] = {n: (torch.cat([A, torch.zeros(64 - IN, IN, dtype=torch.float64)]),
                        torch.cat([B, torch.zeros(OUT, 64 - IN, dtype=torch.float64)], dim=1))
                    for n, (A, B) in full.items()}
    cells[64, 1] = {n: (A.flip(0), B.flip(1)) for n, (A, B) in cells[64, 0].items()}  # the same row space
    sweep = write_sweep(tmp_path / "sw", cells)
    assert [(a.rank, a.seed) for a in sweep_adapters(sweep)] == [(2, 0), (8, 0), (8, 1), (64, 0), (64, 1)]
    s = analyze_sweep(sweep, tmp_path / "out", plots=False)
    assert s["rank_pair"]["ranks"] == [8, 64] and s["rank_pair"]["seed"] == 0  # the paper's pair, not 2 vs 64
    assert s["seed_pair"]["rank"] == 64 and s["seed_pair"]["seeds"] == [0, 1]
    name = NAMES[1]
    A8, A64 = cells[8, 0][name][0], cells[64, 0][name][0]
    u8, u64 = _top_right(A8, 4), _top_right(A64, 4)
    want_top = np.mean([np.linalg.norm(u8[:, :i].T @ u64[:, :j]) ** 2 / min(i, j)
                        for i in range(1, 5) for j in range(1, 5)])
    got = s["rank_pair"]["modules"][name]
    assert got["phi_11"] == pytest.approx(1.0, abs=1e-12)  # the planted shared top direction
    assert got["phi_top4"] == pytest.approx(want_top, abs=1e-12)
    assert 0 < got["random_11"] < 1
    assert s["seed_pair"]["modules"][name]["phi_11"] == pytest.approx(1.0, abs=1e-12)  # same rows, reordered
    assert s["delta_w"] == {} and "pass --base" in s["skipped"]["delta_w"]
    md = (tmp_path / "out" / "sweep_analysis.md").read_text()
    assert "| `model.layers.*.self_attn.q_proj` | 1.000 |" in md
    assert json.loads((tmp_path / "out" / "sweep_analysis.json").read_text()) == s


def test_delta_w_at_both_ranks_against_numpy(tmp_path):
    cells = {(r, 0): _factors(r, 0) for r in (2, 4)}
    sweep = write_sweep(tmp_path / "sw", cells)
    g = torch.Generator().manual_seed(3)
    weights = {f"{n}.weight": torch.randn(OUT, IN, generator=g, dtype=torch.float64) for n in NAMES}
    base = write_base(tmp_path / "base", weights)
    s = analyze_sweep(sweep, tmp_path / "out", base_dir=base, plots=False)
    assert s["rank_pair"]["ranks"] == [2, 4] and "seed_pair" not in s and "one" not in s["skipped"]["seed_pair"]
    for r in (2, 4):
        A, B = (np.asarray(t) for t in cells[r, 0][NAMES[0]])
        W = np.asarray(weights[f"{NAMES[0]}.weight"])
        dw = 2.0 * B @ A  # scaling = lora_alpha / r = 2
        u, _, vt = np.linalg.svd(dw)
        proj = np.linalg.norm(u[:, :r].T @ W @ vt[:r].T)
        got = s["delta_w"][str(r)]["modules"][NAMES[0]]
        assert got["delta_norm"] == pytest.approx(np.linalg.norm(dw), rel=1e-12)
        assert got["amplification"] == pytest.approx(np.linalg.norm(dw) / proj, rel=1e-10)


def test_sweeps_are_pooled_for_the_seed_pair(tmp_path):
    one = write_sweep(tmp_path / "one", {(2, 0): _factors(2, 0), (4, 0): _factors(4, 0)})
    other = write_sweep(tmp_path / "other", {(4, 0): _factors(4, 5), (4, 1): _factors(4, 1)})
    s = analyze_sweep([one, other], tmp_path / "out", plots=False)
    assert s["seed_pair"]["seeds"] == [0, 1] and s["seed_pair"]["rank"] == 4
    A0, A1 = _factors(4, 0)[NAMES[0]][0], _factors(4, 1)[NAMES[0]][0]  # (4, 0): the first dir's run
    want = np.linalg.norm(_top_right(A0, 1).T @ _top_right(A1, 1)) ** 2
    assert s["seed_pair"]["modules"][NAMES[0]]["phi_11"] == pytest.approx(want, abs=1e-12)


def test_incomplete_runs_are_left_out_and_errors_name_the_fix(tmp_path):
    cells = {(1, 0): _factors(1, 0), (4, 0): _factors(4, 0)}
    sweep = write_sweep(tmp_path / "sw", cells, statuses={(4, 0): "running"})
    assert [a.rank for a in sweep_adapters(sweep)] == [1]
    with pytest.raises(AnalysisError, match="one rank only"):
        analyze_sweep(sweep, tmp_path / "out", plots=False)
    with pytest.raises(AnalysisError, match="no sweep.json .* `loralab sweep --out`"):
        sweep_adapters(tmp_path)
    with pytest.raises(AnalysisError, match="not 'lora.alpha'; pass --key"):
        sweep_adapters(sweep, key="lora.alpha")
    (sweep / "runs" / "r1-s0" / "results.json").write_text(json.dumps({"details": {}}))
    with pytest.raises(AnalysisError, match="records no seed"):  # never guessed as 0
        sweep_adapters(sweep)


def test_rank_curves_gain_and_saturation_by_hand(tmp_path):
    cells = {(r, s): _factors(min(r, 2), s) for r in (1, 2, 4, 8) for s in (0, 1)}
    scores = {(1, 0): 0.70, (1, 1): 0.72, (2, 0): 0.80, (2, 1): 0.82, (4, 0): 0.845, (4, 1): 0.855,
              (8, 0): 0.85, (8, 1): 0.87}
    a = write_sweep(tmp_path / "a", cells, scores)
    b = write_sweep(tmp_path / "b", {(r, 0): cells[r, 0] for r in (1, 2, 4, 8)},
                    {(1, 0): 0.6, (2, 0): 0.9, (4, 0): 0.95, (8, 0): 0.96})
    res = rank_curves([("easy", a), ("one-seed", b)], tmp_path / "out", plots=False)
    easy = res["sweeps"]["easy"]
    assert easy["scores"] == pytest.approx([0.71, 0.81, 0.85, 0.86])
    assert easy["tol"] == pytest.approx(0.01)  # half the median seed spread (0.02)
    assert easy["saturation_rank"] == 4 and easy["best_rank"] == 8  # 0.86 - 0.85 <= 0.01
    assert easy["gain"] == pytest.approx([(x - 0.5) / 0.36 for x in (0.71, 0.81, 0.85, 0.86)])
    one = res["sweeps"]["one-seed"]
    assert one["tol"] == pytest.approx(0.02 * 0.46) and one["saturation_rank"] == 8  # 0.96-0.95 > 0.0092
    assert "| easy | accuracy | 2 | 0.5 | 0.71 | 0.81 | 0.85 | 0.86 | 8 | 4 (0.01) |" in \
        (tmp_path / "out" / "ranks.md").read_text()


def test_commands_write_the_report_and_errors_are_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cells = {(r, s): _factors(r, s) for r in (2, 4) for s in (0, 1)}
    sweep = write_sweep(tmp_path / "sw", cells, {k: 0.6 + 0.01 * k[0] for k in cells})
    out = tmp_path / "an"
    assert main(["sweep", str(sweep), "--no-delta-w", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "r=2 vs r=4" in printed and (out / "report" / "index.html").is_file()
    assert (out / "rank-2-vs-4" / "subspace.json").is_file() and (out / "seeds-r4" / "subspace.json").is_file()
    assert main(["ranks", f"{sweep}=toy", str(sweep), "--out", str(tmp_path / "rk")]) == 0
    assert (tmp_path / "rk" / "ranks.png").stat().st_size > 1000
    assert main(["sweep", str(tmp_path), "--no-delta-w", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sweep.json" in err
    assert main(["sweep", str(sweep), "--ranks", "8", "--no-delta-w", "--out", str(out)]) == 2
    assert "--ranks '8': give two integers" in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--ranks", "2,16", "--no-delta-w", "--out", str(out)]) == 2
    assert "no completed run at r = [16]" in capsys.readouterr().err
