"""The report's figures: matplotlib with the Agg backend (imported lazily), one small style, PNG + SVG.

Figures are ``matplotlib.figure.Figure`` objects (no pyplot, no global state); every function writes
``<stem>.png`` and ``<stem>.svg`` into the output directory and returns a ``Plot`` naming them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

STYLE: dict[str, Any] = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.6, "lines.markersize": 4, "figure.dpi": 100, "savefig.dpi": 120,
    "svg.fonttype": "none",
}
PANEL_SIZE = (4.6, 3.0)
"""Inches per panel; a figure of n panels is up to three panels wide."""
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22")


@dataclass
class Plot:
    """One figure written as ``png`` and ``svg`` (paths) with a title and alt text for the page."""

    stem: str
    png: Path
    svg: Path
    title: str
    alt: str


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    lo: Sequence[float] | None = None
    """Error bar bounds (absolute values, not offsets); both or neither."""
    hi: Sequence[float] | None = None
    color: int | None = None
    """Index into COLORS (series of one run share it); None: the next color of the cycle."""
    dashed: bool = False


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series]
    xlabel: str = "step"
    hlines: list[tuple[float, str]] = field(default_factory=list)
    """Dashed horizontal lines (value, label): a baseline."""
    xticks: list[str] | None = None
    """Category names for x = 0, 1, ...; None: a numeric axis."""
    logx: bool = False
    xvalues: list[float] | None = None
    """Numeric x values to put ticks at (a sweep's grid), labelled as written."""


def _mpl() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    return matplotlib


def _style() -> dict[str, Any]:
    from cycler import cycler

    return {**STYLE, "axes.prop_cycle": cycler(color=list(COLORS))}


def _save(fig: Any, out_dir: Path, stem: str, title: str, alt: str) -> Plot:
    png, svg = out_dir / f"{stem}.png", out_dir / f"{stem}.svg"
    fig.savefig(png, format="png", metadata={"Software": None})
    fig.set_layout_engine("none")  # the layout of the PNG's draw, kept: the SVG need not solve it again
    fig.savefig(svg, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = svg.read_text(encoding="utf-8")  # the DTD line names a URL that nothing needs; drop it
    svg.write_text(re.sub(r"<!DOCTYPE svg[^>]*>\s*", "", text, count=1), encoding="utf-8")
    return Plot(stem, png, svg, title, alt)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def panels_plot(panels: list[Panel], out_dir: Path, stem: str, title: str) -> Plot:
    """Line panels side by side (up to three per row), a legend on each panel with several series."""
    mpl = _mpl()
    from matplotlib.figure import Figure

    with mpl.rc_context(_style()):
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, panel in zip(axes, panels):
            _draw_panel(ax, panel)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        if len(panels) > 1:
            fig.suptitle(title)
        alt = f"{title}: " + "; ".join(f"{p.title} ({len(p.series)} series)" for p in panels)
        return _save(fig, out_dir, stem, title, alt)


def _draw_panel(ax: Any, panel: Panel) -> None:
    for series in panel.series:
        points = len(series.x)
        style: dict[str, Any] = {"label": series.label, "linestyle": "--" if series.dashed else "-"}
        if series.color is not None:
            style["color"] = COLORS[series.color % len(COLORS)]
        if series.lo is not None and series.hi is not None:
            err = [[max(0.0, y - lo) for y, lo in zip(series.y, series.lo)],
                   [max(0.0, hi - y) for y, hi in zip(series.y, series.hi)]]
            ax.errorbar(series.x, series.y, yerr=err, marker="o", capsize=3, **style)
        else:
            ax.plot(series.x, series.y, marker="o" if points <= 12 else None, **style)
    for value, label in panel.hlines:
        ax.axhline(value, linestyle="--", color="#555555", linewidth=1.1, label=label)
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.logx:
        ax.set_xscale("log", base=2)
    if panel.xticks is not None:
        ax.set_xticks(range(len(panel.xticks)), panel.xticks)
    elif panel.xvalues and len(panel.xvalues) <= 12:
        ax.set_xticks(panel.xvalues, [f"{v:g}" for v in panel.xvalues])
        ax.minorticks_off()
    elif panel.xlabel == "step":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    entries = len(panel.series) + len(panel.hlines)
    if entries > 1 and len(panel.series) <= 12:
        if entries > 4:
            ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(frameon=False, loc="best")
    if not any(_finite(s.y) for s in panel.series):
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="#888888")


def bar_plot(labels: list[str], values: list[float], out_dir: Path, stem: str, title: str, ylabel: str) -> Plot:
    """Horizontal bars, one per label (e.g. peak memory of several runs), each with its value."""
    mpl = _mpl()
    from matplotlib.figure import Figure

    with mpl.rc_context(_style()):
        fig = Figure(figsize=(PANEL_SIZE[0] * 1.3, 0.9 + 0.35 * len(labels)), layout="constrained")
        ax = fig.subplots()
        colors = [COLORS[i % len(COLORS)] for i in range(len(labels))]
        bars = ax.barh(range(len(labels)), values, color=colors)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], padding=3, fontsize=8)
        ax.set_xlabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", visible=False)
        ax.margins(x=0.15)
        return _save(fig, out_dir, stem, title, f"{title}: " + ", ".join(f"{l} {v:.4g}" for l, v in zip(labels, values)))


def heatmap_plot(name: str, phi: list[list[float]], random_phi: list[list[float]] | None,
                 out_dir: Path, stem: str, zoom: int = 8) -> Plot:
    """φ as a heatmap (rows: i of adapter A, columns: j of adapter B), the zoomed lower-left corner
    when φ is larger than ``zoom`` in either direction, and the random baseline beside it."""
    mpl = _mpl()
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    grids: list[tuple[str, list[list[float]]]] = [("φ", phi)]
    rows, cols = len(phi), len(phi[0]) if phi else 0
    if rows > zoom or cols > zoom:
        grids.append((f"φ, i,j ≤ {zoom}", [r[:zoom] for r in phi[:zoom]]))
    if random_phi:
        grids.append(("random Gaussian", random_phi))
    with mpl.rc_context({**_style(), "axes.grid": False}):
        fig = Figure(figsize=(3.3 * len(grids) + 0.8, 3.2), layout="constrained")
        axes = fig.subplots(1, len(grids), squeeze=False).ravel()
        image = None
        for ax, (label, grid) in zip(axes, grids):
            n_i, n_j = len(grid), len(grid[0]) if grid else 0
            image = ax.imshow(grid, origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                              extent=(0.5, n_j + 0.5, 0.5, n_i + 0.5), interpolation="nearest")
            ax.set_title(label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("j (adapter B)")
            ax.set_ylabel("i (adapter A)")
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.9, label="φ")
        fig.suptitle(name, fontsize=9)
        return _save(fig, out_dir, stem, name, f"subspace similarity φ for {name}, {rows}×{cols}")
