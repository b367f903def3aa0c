"""The sections of an analysis page: subspace similarity φ (summary table, heatmaps with the random
baseline) and the ΔW table with its amplification bars; PNGs already in the directory are shown too."""

from __future__ import annotations

import base64
import math
import re
import shutil
from typing import Any

from loralab.report import plots
from loralab.report.html import esc, table
from loralab.report.page_run import Out, Section
from loralab.report.sources import AnalysisData, ReportError

DELTA_W_COLUMNS = ("r", "delta_norm", "proj_delta", "proj_w_top", "proj_random", "w_norm", "amplification")


def _grid(value: Any, where: str) -> list[list[float]]:
    if not (isinstance(value, list) and value and all(isinstance(r, list) and r for r in value)):
        raise ReportError(f"{where}: expected a non-empty list of rows of numbers; rerun `loralab analyze subspace`")
    width = len(value[0])
    if any(len(r) != width for r in value):
        raise ReportError(f"{where}: rows of different lengths; rerun `loralab analyze subspace`")
    return [[float(x) if isinstance(x, (int, float)) else math.nan for x in r] for r in value]


def _mean(grid: list[list[float]], k: int | None = None) -> float:
    cells = [x for r in grid[:k] for x in r[:k] if math.isfinite(x)]
    return sum(cells) / len(cells) if cells else math.nan


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:80] or "module"


def subspace_sections(data: AnalysisData, out: Out) -> list[Section]:
    sub = data.subspace or {}
    modules = sub["modules"]
    rows, figs = [], []
    for index, (name, mod) in enumerate(modules.items()):
        where = f"{data.path / 'subspace.json'}: modules[{name!r}]"
        if not isinstance(mod, dict):
            raise ReportError(f"{where}: expected an object with r_a, r_b, phi")
        phi = _grid(mod.get("phi"), f"{where}.phi")
        rand = _grid(mod["random_phi"], f"{where}.random_phi") if mod.get("random_phi") else None
        rows.append([name, mod.get("r_a", len(phi)), mod.get("r_b", len(phi[0])), phi[0][0], _mean(phi, 8),
                     _mean(rand, 8) if rand else None])
        figs.append(out.figure(plots.heatmap_plot(name, phi, rand, out.dir, out.stem(f"phi-{index}-{_slug(name)}"))))
    adapters = sub.get("adapters") or []
    head = (f"<p>Subspace similarity φ(i, j) between the top-i and top-j singular directions of "
            f"<code>lora_{esc(sub.get('use') or 'A')}</code> of "
            + " and ".join(f"<code>{esc(a)}</code>" for a in adapters[:2]) + " (1: the same subspace, 0: orthogonal).</p>")
    summary = table(["module", "r_a", "r_b", "φ(1,1)", "mean φ, i,j ≤ 8", "random, i,j ≤ 8"], rows, "phi-summary")
    return [(out.stem("subspace"), "Subspace similarity", head + summary + f'<div class="figs">{"".join(figs)}</div>')]


def delta_w_sections(data: AnalysisData, out: Out) -> list[Section]:
    modules = (data.delta_w or {})["modules"]
    rows, names, amps = [], [], []
    for name, mod in modules.items():
        if not isinstance(mod, dict):
            raise ReportError(f"{data.path / 'delta_w.json'}: modules[{name!r}] is not an object")
        rows.append([name, *(mod.get(c) for c in DELTA_W_COLUMNS)])
        amp = mod.get("amplification")
        if isinstance(amp, (int, float)) and not isinstance(amp, bool) and math.isfinite(amp):
            names.append(name)
            amps.append(float(amp))
    parts = ["<p>‖ΔW‖<sub>F</sub>, W projected on ΔW's top-r subspace (proj_delta), on W's own top-r "
             "(proj_w_top) and on random bases (proj_random); amplification = ‖ΔW‖<sub>F</sub> / proj_delta "
             "(Hu et al. 2021, Table 7).</p>", table(["module", *DELTA_W_COLUMNS], rows, "delta-w")]
    if amps:
        plot = plots.bar_plot(names, amps, out.dir, out.stem("amplification"), "Amplification factor", "‖ΔW‖ / proj_delta")
        parts.append(f'<div class="figs">{out.figure(plot)}</div>')
    return [(out.stem("delta-w"), "ΔW against W", "\n".join(parts))]


def image_section(data: AnalysisData, out: Out) -> Section | None:
    """The PNGs the analysis wrote, copied beside the page."""
    if not data.images:
        return None
    figs = []
    for image in data.images:
        target = out.dir / f"{out.stem('orig-')}{image.name}"
        shutil.copyfile(image, target)
        src = ("data:image/png;base64," + base64.b64encode(target.read_bytes()).decode("ascii")) if out.embed else target.name
        figs.append(f'<figure><img src="{esc(src)}" alt="{esc(image.stem)}">'
                    f"<figcaption>{esc(image.name)} (from the analysis)</figcaption></figure>")
    return (out.stem("analysis-figures"), "Figures from the analysis", f'<div class="figs">{"".join(figs)}</div>')


def analysis_sections(data: AnalysisData, out: Out) -> list[Section]:
    sections: list[Section] = []
    if data.subspace is not None:
        sections += subspace_sections(data, out)
    if data.delta_w is not None:
        sections += delta_w_sections(data, out)
    extra = image_section(data, out)
    return sections + ([extra] if extra else [])

