"""The sections of a sweep's page: a summary verdict, score vs each swept key (one line per value of
the other keys, min–max error bars over seeds, the baseline dashed), the table of points, and the
training curves of its runs overlaid."""

from __future__ import annotations

import math
import statistics
from typing import Any

from loralab.report import plots
from loralab.report.html import Raw, esc, fmt, learned_mark, markdown, num, table
from loralab.report.page_run import Out, Section, curve_panels
from loralab.report.sources import RunData, SweepData

MAX_OVERLAID_RUNS = 24


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def swept_keys(sweep: dict[str, Any]) -> list[str]:
    """Grid keys with more than one value (a one-value key is fixed in effect)."""
    return [k for k, values in sweep["grid"].items() if isinstance(values, list) and len(values) > 1]


def point_learned(point: dict[str, Any]) -> Any:
    """True when every seed learned, False when any did not, None when none could tell."""
    marks = point.get("learned")
    marks = marks if isinstance(marks, list) else [marks]
    if any(m is False for m in marks):
        return False
    if marks and all(m is True for m in marks):
        return True
    return None


def _label(overrides: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={fmt(overrides.get(k))}" for k in keys) or "median over seeds"


def sweep_panel(sweep: dict[str, Any], key: str) -> plots.Panel:
    """Score (median over seeds) against ``key``; one series per combination of the other swept keys."""
    others = [k for k in swept_keys(sweep) if k != key]
    order = sweep["grid"][key]
    numeric = all(_is_num(v) for v in order)
    xticks = None if numeric else [fmt(v) for v in order]
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in sweep["points"]:
        groups.setdefault(_label(point.get("overrides") or {}, others), []).append(point)
    series, baselines = [], {}
    for label, points in groups.items():
        rows = []
        for point in points:
            x = point.get("overrides", {}).get(key)
            if not _is_num(point.get("score")) or x not in order:
                continue
            spread = point.get("spread") if isinstance(point.get("spread"), list) else None
            lo, hi = (spread if spread and len(spread) == 2 and all(map(_is_num, spread)) else [point["score"]] * 2)
            rows.append((x if numeric else order.index(x), point["score"], lo, hi))
        rows.sort()
        if rows:
            series.append(plots.Series(label, [r[0] for r in rows], [r[1] for r in rows],
                                       [r[2] for r in rows], [r[3] for r in rows]))
        bases = [p["baseline"] for p in points if _is_num(p.get("baseline"))]
        if bases:
            baselines[label] = statistics.median(bases)
    distinct = sorted(set(round(b, 12) for b in baselines.values()))
    if len(distinct) == 1:
        hlines = [(distinct[0], "baseline")]
    else:
        hlines = [(b, f"baseline {label}") for label, b in baselines.items()]
    positive = numeric and all(v > 0 for v in order)
    logx = positive and max(order) / min(order) >= 8
    metric = sweep.get("main_metric") or "score"
    better = "higher" if sweep.get("greater_is_better", True) else "lower"
    return plots.Panel(f"{metric} vs {key}", f"{metric} ({better} is better)", series, xlabel=key,
                       hlines=hlines, xticks=xticks, logx=logx, xvalues=sorted(order) if numeric else None)


def summary(sweep: dict[str, Any]) -> Raw:
    points = sweep["points"]
    marks = [point_learned(p) for p in points]
    scored = [p for p in points if _is_num(p.get("score"))]
    bad = marks.count(False)
    cls = "bad" if bad else ("ok" if marks and all(m is True for m in marks) else "unknown")
    text = f"{len(points)} points: {marks.count(True)} learned, {bad} did not learn, {marks.count(None)} unknown"
    if scored:
        pick = max if sweep.get("greater_is_better", True) else min
        best = pick(scored, key=lambda p: p["score"])
        text_best = (f" · best {esc(sweep.get('main_metric') or 'score')} {num(best['score'], 'best')} at "
                     f"{esc(_label(best.get('overrides') or {}, list(best.get('overrides') or {})))}")
    else:
        text_best = " · no point has a score"
    head = "✗ " if bad else ("✓ " if cls == "ok" else "? ")
    return Raw(f'<div class="verdict {cls}">{head}{esc(text)}{text_best}</div>')


def points_table(sweep: dict[str, Any]) -> Raw:
    keys = list(dict.fromkeys(k for p in sweep["points"] for k in (p.get("overrides") or {})))
    rows = []
    for point in sweep["points"]:
        over = point.get("overrides") or {}
        spread = point.get("spread") if isinstance(point.get("spread"), list) else None
        seeds = point.get("scores") if isinstance(point.get("scores"), list) else []
        status = point.get("status") if isinstance(point.get("status"), list) else []
        per_seed = point.get("learned") if isinstance(point.get("learned"), list) else []
        marks = Raw(" ".join({True: "✓", False: "✗"}.get(m, "?") for m in per_seed))
        rows.append([*(over.get(k) for k in keys), point.get("score"),
                     Raw(f"{num(spread[0])} – {num(spread[1])}") if spread and len(spread) == 2 else None,
                     point.get("baseline"), learned_mark(point_learned(point)), marks,
                     Raw(", ".join(num(s) for s in seeds)), ", ".join(map(str, status)) or None])
    return table([*keys, "score (median)", "min – max", "baseline", "learned", "per seed", "seed scores",
                  "status"], rows, "points")


def run_labels(data: SweepData) -> list[tuple[RunData, str]]:
    """The sweep's readable runs, each named by its point's swept values and its seed."""
    keys = swept_keys(data.sweep)
    out = []
    for point in data.sweep["points"]:
        for entry in point.get("runs") or []:
            run = data.runs.get(str(entry))
            if run is not None:
                seed = (run.config.get("train") or {}).get("seed")
                out.append((run, _label(point.get("overrides") or {}, keys) + (f" seed {seed}" if seed is not None else "")))
    return out


def sweep_sections(data: SweepData, out: Out) -> list[Section]:
    sweep = data.sweep
    keys = swept_keys(sweep)
    figs = [out.figure(plots.panels_plot([sweep_panel(sweep, k)], out.dir, out.stem(f"sweep-{i}"),
                                         f"{sweep.get('main_metric') or 'score'} vs {k}"))
            for i, k in enumerate(keys)]
    seeds = sweep.get("seeds") or []
    meta = table(["preset", "swept", "fixed", "seeds"],
                 [[sweep.get("preset"), ", ".join(f"{k} ∈ {{{fmt(v)}}}" for k, v in sweep["grid"].items()),
                   ", ".join(f"{k}={fmt(v)}" for k, v in (sweep.get("fixed") or {}).items()) or None,
                   ", ".join(map(str, seeds)) or None]], "sweep-meta")
    parts = [summary(sweep), meta, f'<div class="figs">{"".join(figs)}</div>' if figs else
             "<p>No key takes more than one value: nothing to plot against.</p>"]
    parts += [f'<p class="warn">{esc(w)}</p>' for w in data.warnings]
    sections = [(out.stem("sweep"), f"Sweep · {data.path.name}", "\n".join(parts)),
                (out.stem("points"), "Points", points_table(sweep))]
    labelled = run_labels(data)[:MAX_OVERLAID_RUNS]
    if labelled:
        runs, labels = [r for r, _ in labelled], [l for _, l in labelled]
        curve_figs = [out.figure(plots.panels_plot(panels, out.dir, out.stem(f"sweep-runs-{stem}"), title))
                      for stem, (title, panels) in curve_panels(runs, labels).items() if stem in ("loss", "eval")]
        if curve_figs:
            note = f"<p>First {len(runs)} of {len(data.runs)} runs.</p>" if len(data.runs) > len(runs) else ""
            sections.append((out.stem("sweep-runs"), "Runs' curves", note + f'<div class="figs">{"".join(curve_figs)}</div>'))
    if data.markdown:
        sections.append((out.stem("sweep-md"), "sweep.md", "<details><summary>sweep.md as written by the sweep</summary>"
                         + markdown(data.markdown) + "</details>"))
    return sections
