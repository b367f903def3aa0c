"""Figures for the analyses (matplotlib imported lazily, drawn on an Agg canvas; pyplot is never used, so
the process's backend and global figure state are left alone).

* :func:`phi_heatmap` — Hu et al. 2021 Fig. 3/4 layout: φ(i, j) over the full r_a × r_b grid (i on the
  vertical axis, 1 at the bottom) and a zoomed panel of its lower-left corner i, j ≤ min(8, r_a, r_b).
* :func:`per_layer_summary` — Fig. 6/7 in brief: φ(1, 1) per layer index, one line per module family
  (the name with its layer index replaced by ``*``), each with its random baseline dashed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from loralab.analysis.adapters import AnalysisError

__all__ = ["phi_heatmap", "per_layer_summary", "layer_of"]

_LAYER = re.compile(r"(?<=\.)(\d+)(?=\.)")


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError("the plots need matplotlib: pip install matplotlib (or pass plots=False)") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _grid(phi: list[list[float | None]]):
    import numpy as np

    return np.array([[math.nan if v is None else v for v in row] for row in phi], dtype=np.float64)


def phi_heatmap(phi: list[list[float | None]], path: str | Path, title: str = "", use: str = "A",
                labels: tuple[str, str] = ("a", "b"), zoom: int = 8) -> Path:
    """Write a two-panel heatmap of φ (rows i = 1..r_a, columns j = 1..r_b; ``None`` cells grey) to ``path``."""
    import numpy as np

    g = _grid(phi)
    ra, rb = g.shape
    k = max(1, min(zoom, ra, rb))
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, width_ratios=[2, 1])
    cmap = _cmap()
    for ax, data, full in ((axes[0], g, True), (axes[1], g[:k, :k], False)):
        im = ax.imshow(np.ma.masked_invalid(data), origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap=cmap,
                       extent=(0.5, data.shape[1] + 0.5, 0.5, data.shape[0] + 0.5), interpolation="nearest")
        ax.set_xlabel(f"j  ({labels[1]}, r={rb})")
        ax.set_ylabel(f"i  ({labels[0]}, r={ra})")
        ax.set_title("φ(i, j)" if full else f"zoom: i, j ≤ {k}", fontsize=10)
        _ticks(ax, data.shape)
    fig.colorbar(im, ax=list(axes), shrink=0.9, label="φ")
    note = "; grey: past a factor's numerical rank (undetermined)" if np.isnan(g).any() else ""
    fig.suptitle(f"{title}  (lora_{use} {'right' if use == 'A' else 'left'}-singular vectors{note})", fontsize=10)
    fig.savefig(path)
    return Path(path)


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="0.75")


def _ticks(ax, shape: tuple[int, int]) -> None:
    for n, setter in ((shape[1], ax.set_xticks), (shape[0], ax.set_yticks)):
        step = max(1, math.ceil(n / 8))
        setter([1] + list(range(step, n + 1, step)) if step > 1 else list(range(1, n + 1)))


def layer_of(name: str) -> tuple[str, int] | None:
    """(family, layer index) of a module name with an integer component, e.g.
    ``model.layers.3.self_attn.q_proj`` -> (``model.layers.*.self_attn.q_proj``, 3); None without one."""
    m = _LAYER.search(name)
    if m is None:
        return None
    return name[:m.start()] + "*" + name[m.end():], int(m.group(1))


def per_layer_summary(modules: dict[str, dict], path: str | Path) -> Path | None:
    """Plot φ(1, 1) (and its random baseline) against the layer index, one line per module family.

    Written only when some family has modules at two or more layers; returns the path or None.
    """
    fams: dict[str, list[tuple[int, float, float]]] = {}
    for name, e in modules.items():
        fl = layer_of(name)
        if fl is None or not e["phi"] or e["phi"][0][0] is None:
            continue
        fams.setdefault(fl[0], []).append((fl[1], e["phi"][0][0], e["random_phi"][0][0]))
    fams = {f: sorted(v) for f, v in fams.items() if len({p[0] for p in v}) >= 2}
    if not fams:
        return None
    fig = _figure(7, 4)
    ax = fig.subplots()
    for fam, pts in sorted(fams.items()):
        xs = [p[0] for p in pts]
        line, = ax.plot(xs, [p[1] for p in pts], marker="o", label=fam)
        ax.plot(xs, [p[2] for p in pts], linestyle="--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("φ(1, 1)")
    ax.set_ylim(0, 1.02)
    ax.set_title("top-direction similarity per layer (dashed: random Gaussian baseline)", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return Path(path)


def rank_curves_plot(result: dict, path: str | Path) -> Path:
    """Left: each sweep's median score against rank (log2 axis), its baseline dashed. Right: the share of the
    best gain over the baseline, with each sweep's saturation rank marked."""
    fig = _figure(11, 4)
    raw, gain = fig.subplots(1, 2)
    for label, c in result["sweeps"].items():
        line, = raw.plot(c["ranks"], c["scores"], marker="o", label=f"{label} ({c['metric']})")
        if c["baseline"] is not None:
            raw.axhline(c["baseline"], linestyle="--", color=line.get_color(), alpha=0.6)
        g = [math.nan if v is None else v for v in c["gain"]]
        gain.plot(c["ranks"], g, marker="o", color=line.get_color(), label=label)
        sat = c["ranks"].index(c["saturation_rank"])
        gain.plot([c["saturation_rank"]], [g[sat]], marker="*", markersize=16, color=line.get_color(),
                  linestyle="none")
    for ax in (raw, gain):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(result.get("key", "rank"))
        ax.legend(fontsize=8)
    raw.set_ylabel("median score (dashed: baseline)")
    gain.set_ylabel("(score - baseline) / (best - baseline)")
    gain.set_title("share of the best gain; ★ saturation rank", fontsize=10)
    if result.get("title"):
        fig.suptitle(result["title"], fontsize=11)
    fig.savefig(path)
    return Path(path)
