"""``loralab report PATH... --out DIR``: one static HTML page (``DIR/index.html``) with its figures
(PNG and SVG) beside it, for run, sweep and analysis directories.

Several run dirs get their curves overlaid and a config-difference table first, then each run's own
sections. Exit codes: 0 written; 2 bad input (one line ``loralab report: error: ...`` on stderr).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from loralab.report.html import page
from loralab.report.page_analysis import analysis_sections
from loralab.report.page_run import Out, Section, compare_sections, labels_for, run_sections
from loralab.report.page_sweep import sweep_sections
from loralab.report.sources import ReportError, RunData, detect, read_analysis, read_run, read_sweep

PROG = "loralab report"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Write an HTML report (index.html, PNG and SVG plots) "
                                "for run, sweep or analysis directories.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="a run dir (results.json, metrics.jsonl), a sweep dir (sweep.json) or an analysis dir "
                        "(subspace.json, delta_w.json); several run dirs are compared")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where index.html and the plots go")
    p.add_argument("--title", help="the page title (default: from the inputs)")
    p.add_argument("--embed", action="store_true", help="embed the PNGs in index.html as data URIs (one file to share)")
    return p


def _title(kinds: list[str], names: list[str]) -> str:
    if len(kinds) == 1:
        return f"{kinds[0].capitalize()} · {names[0]}"
    if set(kinds) == {"run"}:
        return f"{len(kinds)} runs · " + ", ".join(names[:4]) + (" …" if len(names) > 4 else "")
    return "Report · " + ", ".join(names[:4]) + (" …" if len(names) > 4 else "")


def _relabel(sections: list[Section], label: str) -> list[Section]:
    return [(sid, head if label in head else f"{head} · {label}", inner) for sid, head, inner in sections]


def build(paths: Sequence[Path], out_dir: Path, *, presets: Mapping[str, Mapping[str, Any]] | None = None,
          embed: bool = False, title: str | None = None) -> Path:
    """Write ``out_dir/index.html`` and its figures; returns the page's path. Raises ``ReportError``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir}: --out exists and is not a directory; pass a directory")
    kinds = [detect(Path(p)) for p in paths]
    sources: list[Any] = []
    for path, kind in zip(paths, kinds):
        path = Path(path)
        if kind == "run":
            run = read_run(path, presets)
            if run.results is None and not run.metrics and not run.config:
                raise ReportError(f"{path}: the run dir has no readable results.json, metrics.jsonl or config.yaml")
            sources.append(run)
        else:
            sources.append(read_sweep(path, presets) if kind == "sweep" else read_analysis(path))
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("matplotlib is not installed; install it (pip install matplotlib) to draw the plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [s for s in sources if isinstance(s, RunData)]
    single = len(sources) == 1
    sections: list[Section] = []
    if len(runs) > 1:
        sections += compare_sections(runs, Out(out_dir, embed, "compare-"))
    labels = dict(zip(map(id, runs), labels_for(runs))) if runs else {}
    counters: dict[str, int] = {}
    for source, kind in zip(sources, kinds):
        counters[kind] = counters.get(kind, 0) + 1
        out = Out(out_dir, embed, "" if single else f"{kind}{counters[kind]}-")
        if kind == "run":
            own = run_sections(source, out)
            sections += _relabel(own, labels[id(source)]) if len(runs) > 1 else own
        elif kind == "sweep":
            sections += sweep_sections(source, out)
        else:
            own = analysis_sections(source, out)
            sections += own if single else _relabel(own, source.path.name)
    names = [labels.get(id(s)) or s.path.name for s in sources]
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = f"loralab report · {stamp} · " + " · ".join(str(Path(p)) for p in paths)
    index = out_dir / "index.html"
    index.write_text(page(title or _title(kinds, names), subtitle, sections), encoding="utf-8")
    return index


def main(argv: Sequence[str] | None = None, presets: Mapping[str, Mapping[str, Any]] | None = None) -> int:
    """``loralab report PATH... --out DIR [--title T] [--embed]``; ``presets`` ({name: overrides}) lets
    the page diff a run's config against the preset named in its ``config.yaml``."""
    args = parser().parse_args(list(argv) if argv is not None else None)
    try:
        index = build(args.paths, args.out, presets=presets, embed=args.embed, title=args.title)
    except ReportError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
