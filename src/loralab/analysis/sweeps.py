"""The paper's analyses over the adapters a rank sweep trained, and score-against-rank curves across sweeps.

``analyze_sweep`` (``loralab analyze sweep SWEEP_DIR --out DIR``) picks, from a ``loralab sweep`` directory
whose grid varies the rank (``lora.r``):

* the **rank pair** (Fig. 3): φ(A_lo, A_hi) for two ranks of the same seed (default r = 8 and 64, the
  paper's; otherwise the smallest and largest ranks trained), in ``DIR/rank-<lo>-vs-<hi>/``;
* the **seed pair** (Fig. 4): φ between two seeds at the same rank (default: the high rank), in
  ``DIR/seeds-r<r>/``;
* **ΔW against W** (Table 7) at both ranks, in ``DIR/delta-w-r<r>/`` (needs the base model's weights);

and writes ``DIR/sweep_analysis.json`` / ``.md``: per module φ(1,1) and the mean of φ(i,j) over i, j ≤ 4
for each pair beside the random-Gaussian baseline of the same shapes, and each rank's amplification
‖ΔW‖_F / ‖U^⊤ W V‖_F; the Markdown gives per module family the median over layers, with the paper's
numbers beside them.

``rank_curves`` (``loralab analyze ranks SWEEP_DIR[=LABEL]... --out DIR``) puts several rank sweeps on one
plot (rank × model size, rank × task difficulty). A sweep's points are (r, median score over seeds); its
gain at r is (score - baseline) / (best - baseline), the share of the best improvement over the
un-adapted/majority baseline that rank reaches, which makes tasks with different metrics comparable. The
**saturation rank** is the smallest r whose median score is within ``tol`` of the best median, tol = half
the median seed spread (max - min) over the sweep's points, or 2% of (best - baseline) when there is one
seed: the rank past which the score stops improving by more than its noise.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from loralab.analysis.adapters import AnalysisError
from loralab.analysis.delta_w import markdown_table, run_delta_w
from loralab.analysis.subspace import run_subspace

__all__ = ["SweepAdapter", "sweep_adapters", "analyze_sweep", "rank_curves", "PAPER_TABLE7"]

PAPER_TABLE7 = {"4": {"delta_norm": 6.91, "proj_delta": 0.32, "proj_w_top": 21.67, "proj_random": 0.02},
                "64": {"delta_norm": 3.57, "proj_delta": 1.90, "proj_w_top": 37.71, "proj_random": 0.33}}
"""Hu et al. 2021, Table 7: GPT-3 175B, W_q of layer 48 (‖W_q‖_F = 61.95). Amplification = delta_norm /
proj_delta: 21.6 at r = 4, 1.9 at r = 64."""
TOP = 4  # φ is averaged over i, j ≤ TOP: the paper's "top directions"
DELTA_W_KEYS = ("rank", "rank_delta", "delta_norm", "proj_delta", "proj_w_top", "proj_random", "w_norm",
                "amplification")  # of run_delta_w's per-module entry, kept in the summary


@dataclass
class SweepAdapter:
    rank: int
    seed: int
    run_dir: Path
    adapter_dir: Path
    model: str | None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnalysisError(f"no {path.name} in {path.parent}: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnalysisError(f"{path} is not valid JSON ({e}); rerun the sweep to rewrite it") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def sweep_adapters(sweep_dir: str | Path, key: str = "lora.r") -> list[SweepAdapter]:
    """Every completed run of the sweep with an adapter, as (rank, seed, dirs, model), sorted by rank, seed."""
    root = Path(sweep_dir)
    sweep = _read_json(root / "sweep.json", "pass a directory written by `loralab sweep --out`")
    if key not in sweep.get("grid", {}):
        raise AnalysisError(f"{root / 'sweep.json'}: the grid varies {sorted(sweep.get('grid', {}))}, not {key!r}; "
                            "pass --key with the rank's key")
    found: list[SweepAdapter] = []
    for point in sweep.get("points", []):
        for rel, status in zip(point.get("runs", []), point.get("status", [])):
            run = root / rel
            if status != "completed" or not (run / "adapter" / "adapter_config.json").is_file():
                continue
            results = _read_json(run / "results.json", "the run did not finish")
            info = {**results.get("details", {}), **results.get("run", {})}  # "run": the schema's, every experiment
            if "seed" not in info:
                raise AnalysisError(f"{run / 'results.json'} records no seed (run.seed); rerun the run")
            found.append(SweepAdapter(int(point["overrides"][key]), int(info["seed"]), run, run / "adapter",
                                      info.get("model")))
    if not found:
        raise AnalysisError(f"{root}: no completed run with an adapter yet; let the sweep finish (it resumes)")
    return sorted(found, key=lambda a: (a.rank, a.seed))


def _phi_summary(sub: dict) -> dict[str, dict]:
    def mean(grid: list, k: int) -> float | None:
        cells = [x for row in grid[:k] for x in row[:k] if x is not None]
        return sum(cells) / len(cells) if cells else None

    return {name: {"phi_11": e["phi"][0][0], "random_11": e["random_phi"][0][0],
                   f"phi_top{TOP}": mean(e["phi"], TOP), f"random_top{TOP}": mean(e["random_phi"], TOP)}
            for name, e in sub["modules"].items()}


def _pick_ranks(ranks: list[int], want: tuple[int, int] | None) -> tuple[int, int]:
    if want is not None:
        missing = [r for r in want if r not in ranks]
        if missing:
            raise AnalysisError(f"--ranks {want[0]},{want[1]}: no completed run at r = {missing}; trained: {ranks}")
        return want
    if 8 in ranks and 64 in ranks:
        return 8, 64
    if len(ranks) < 2:
        raise AnalysisError(f"the sweep has completed runs at one rank only ({ranks}); a rank pair needs two")
    return ranks[0], ranks[-1]


def analyze_sweep(sweep_dirs: str | Path | list, out_dir: str | Path, *, base_dir: str | Path | None = None,
                  ranks: tuple[int, int] | None = None, seed_rank: int | None = None, modules: str | None = None,
                  key: str = "lora.r", plots: bool = True) -> dict:
    """The rank pair, the seed pair and ΔW at both ranks (see the module docstring); returns the summary.

    Several sweep dirs (e.g. a one-seed rank sweep and a second seed at two ranks) are pooled; for a
    (rank, seed) trained in more than one, the first dir's run is used. ``base_dir`` None skips ΔW
    (recorded in the summary's ``skipped``)."""
    out = Path(out_dir)
    dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    by: dict[tuple[int, int], SweepAdapter] = {}
    for d in dirs:
        for a in sweep_adapters(d, key):
            by.setdefault((a.rank, a.seed), a)
    lo, hi = _pick_ranks(sorted({r for r, _ in by}), ranks)
    common = sorted({s for r, s in by if r == lo} & {s for r, s in by if r == hi})
    if not common:
        raise AnalysisError(f"r = {lo} and r = {hi} have no seed in common; pass --ranks")
    seed = common[0]
    summary: dict = {"sweep": ", ".join(map(str, dirs)), "key": key, "model": by[lo, seed].model, "top": TOP,
                     "skipped": {}}
    rank_dir = out / f"rank-{lo}-vs-{hi}"
    sub = run_subspace(by[lo, seed].adapter_dir, by[hi, seed].adapter_dir, rank_dir, modules, plots=plots)
    summary["rank_pair"] = {"ranks": [lo, hi], "seed": seed, "dir": rank_dir.name, "modules": _phi_summary(sub)}
    seed_rank = hi if seed_rank is None else seed_rank
    seeds = sorted(s for r, s in by if r == seed_rank)
    if len(seeds) >= 2:
        seed_dir = out / f"seeds-r{seed_rank}"
        sub = run_subspace(by[seed_rank, seeds[0]].adapter_dir, by[seed_rank, seeds[1]].adapter_dir, seed_dir,
                           modules, plots=plots)
        summary["seed_pair"] = {"rank": seed_rank, "seeds": seeds[:2], "dir": seed_dir.name,
                                "modules": _phi_summary(sub)}
    else:
        summary["skipped"]["seed_pair"] = f"r = {seed_rank} has {len(seeds)} completed seed(s); two are needed"
    summary["delta_w"] = {}
    if base_dir is None:
        summary["skipped"]["delta_w"] = "no base model directory (pass --base)"
    for r in (lo, hi) if base_dir is not None else ():
        dw_dir = out / f"delta-w-r{r}"
        res = run_delta_w(by[r, seed].adapter_dir, base_dir, dw_dir, modules=modules)
        summary["delta_w"][str(r)] = {"dir": dw_dir.name, "modules": {
            n: {k: e[k] for k in DELTA_W_KEYS} for n, e in res["modules"].items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_analysis.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    (out / "sweep_analysis.md").write_text(sweep_markdown(summary))
    return summary


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _family(name: str) -> str:
    from loralab.analysis.plots import layer_of

    fl = layer_of(name)
    return fl[0] if fl else name


def _family_medians(modules: dict[str, dict], field: str) -> dict[str, float | None]:
    """Median over layers: one layer's near-zero projection (amplification 400) must not set the row."""
    fams: dict[str, list[float]] = {}
    for name, e in modules.items():
        fams.setdefault(_family(name), [])
        if e.get(field) is not None:
            fams[_family(name)].append(e[field])
    return {f: (statistics.median(v) if v else None) for f, v in fams.items()}


def sweep_markdown(s: dict) -> str:
    """The summary as Markdown: one row per module family (median over layers), then per module."""
    lo, hi = s["rank_pair"]["ranks"]
    pairs = [("rank_pair", f"r={lo} vs r={hi}")] + ([("seed_pair", f"r={s['seed_pair']['rank']} seeds "
                                                     f"{s['seed_pair']['seeds']}")] if "seed_pair" in s else [])
    lines = [f"# Adapter analyses of sweep `{s['sweep']}` ({s['model']})", ""]
    head = ["module family"]
    for _, label in pairs:
        head += [f"φ(1,1) {label}", f"φ≤{TOP} {label}", "random φ(1,1)"]
    head += [f"amplification r={r}" for r in s["delta_w"]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    columns = [(_family_medians(s[pair]["modules"], field), ".3f") for pair, _ in pairs
               for field in ("phi_11", f"phi_top{TOP}", "random_11")]
    columns += [(_family_medians(d["modules"], "amplification"), ".2f") for d in s["delta_w"].values()]
    for fam in sorted({_family(n) for n in s["rank_pair"]["modules"]}):
        lines.append("| " + " | ".join([f"`{fam}`"] + [_f(col.get(fam), fmt) for col, fmt in columns]) + " |")
    lines += ["", f"Medians over layers. φ(1,1): overlap of the top input direction of lora_A; φ≤{TOP}: φ(i,j) "
              f"averaged over i, j ≤ {TOP}; random: Gaussian factors of the same shapes. Paper (GPT-3 175B, "
              "layer 48): φ(1,1) between A_8 and A_64 above 0.5 for W_q and W_v (Fig. 3); amplification of "
              f"W_q {PAPER_TABLE7['4']['delta_norm'] / PAPER_TABLE7['4']['proj_delta']:.1f} at r=4 and "
              f"{PAPER_TABLE7['64']['delta_norm'] / PAPER_TABLE7['64']['proj_delta']:.1f} at r=64 (Table 7).", ""]
    for r, d in s["delta_w"].items():
        lines += [f"## ΔW against W, r = {r}", "", markdown_table(d["modules"])]
    for why in s["skipped"].values():
        lines.append(f"Not computed: {why}.")
    return "\n".join(lines) + "\n"


def _curve(sweep_dir: Path, key: str) -> dict:
    sweep = _read_json(sweep_dir / "sweep.json", "pass a directory written by `loralab sweep --out`")
    pts, spreads, bases = [], [], []
    for p in sweep.get("points", []):
        if key not in p.get("overrides", {}):
            raise AnalysisError(f"{sweep_dir / 'sweep.json'}: its grid does not vary {key!r}; pass --key")
        if p.get("score") is None:
            continue
        r = float(p["overrides"][key])
        pts.append((int(r) if r.is_integer() else r, float(p["score"])))
        if p.get("spread") and sum(s is not None for s in p.get("scores", [])) > 1:
            spreads.append(p["spread"][1] - p["spread"][0])
        if p.get("baseline") is not None:
            bases.append(float(p["baseline"]))
    if len(pts) < 2:
        raise AnalysisError(f"{sweep_dir}: fewer than two ranks have a finished run; let the sweep finish")
    pts.sort()
    greater = bool(sweep.get("greater_is_better", True))
    sign = 1.0 if greater else -1.0
    base = statistics.median(bases) if bases else None
    best = max(pts, key=lambda p: sign * p[1])
    ref = base if base is not None else min(pts, key=lambda p: sign * p[1])[1]
    span = sign * (best[1] - ref)
    tol = statistics.median(spreads) / 2 if spreads else 0.02 * abs(span)
    saturation = next(r for r, s in pts if sign * (best[1] - s) <= tol + 1e-12)  # 1e-12: float rounding
    gain = [(s - ref) / (best[1] - ref) if best[1] != ref else None for _, s in pts]
    return {"metric": sweep.get("main_metric"), "greater_is_better": greater, "ranks": [r for r, _ in pts],
            "scores": [s for _, s in pts], "baseline": base, "gain": gain, "best_rank": best[0], "tol": tol,
            "saturation_rank": saturation, "seeds": len(sweep.get("seeds", []))}


def rank_curves(sweeps: list[tuple[str, str | Path]], out_dir: str | Path, key: str = "lora.r",
                title: str = "", plots: bool = True) -> dict:
    """Score against rank for several sweeps ([(label, sweep_dir)]); writes ``ranks.json``, ``ranks.md`` and
    (with ``plots``) ``ranks.png``. Returns ``{"key", "sweeps": {label: curve}}``."""
    if not sweeps:
        raise AnalysisError("pass at least one sweep directory")
    result = {"key": key, "title": title, "sweeps": {label: {"dir": str(d), **_curve(Path(d), key)}
                                                     for label, d in sweeps}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranks.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    all_r = sorted({r for c in result["sweeps"].values() for r in c["ranks"]})
    lines = [f"# {title or 'Score against rank'}", "", "| sweep | metric | seeds | baseline | " +
             " | ".join(f"r={r:g}" for r in all_r) + " | best r | saturation r (tol) |",
             "|" + "---|" * (len(all_r) + 6)]
    for label, c in result["sweeps"].items():
        at = dict(zip(c["ranks"], c["scores"]))
        lines.append(f"| {label} | {c['metric']} | {c['seeds']} | {_f(c['baseline'], '.4g')} | " +
                     " | ".join(_f(at.get(r), ".4g") for r in all_r) +
                     f" | {c['best_rank']:g} | {c['saturation_rank']:g} ({c['tol']:.3g}) |")
    lines += ["", "Median over seeds. Saturation r: the smallest rank within tol of the best median (tol = half "
              "the median seed spread, or 2% of the gain over the baseline with one seed)."]
    (out / "ranks.md").write_text("\n".join(lines) + "\n")
    if plots:
        from loralab.analysis.plots import rank_curves_plot

        rank_curves_plot(result, out / "ranks.png")
    return result
