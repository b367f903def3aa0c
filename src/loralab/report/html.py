"""HTML primitives for the report: escaping, numbers that carry their exact value, tables, figures,
a small Markdown-table renderer and the page shell (inline CSS, no scripts, no external references).
"""

from __future__ import annotations

import base64
import html as _html
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from loralab.report.plots import Plot


class Raw(str):
    """Markup that is already HTML (not escaped again)."""


def esc(value: Any) -> str:
    return value if isinstance(value, Raw) else _html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A value as a reader sees it: 4 significant digits, integers whole, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if value != 0 else "0"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) if len(value) <= 8 else json.dumps(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def num(value: Any, cls: str = "") -> Raw:
    """A number shown with ``fmt`` that keeps its exact JSON value in ``data-value`` (for tests and tools)."""
    exact = json.dumps(value, allow_nan=True)
    klass = f"num {cls}".strip()
    return Raw(f'<span class="{esc(klass)}" data-value="{esc(exact)}">{esc(fmt(value))}</span>')


def learned_mark(learned: Any) -> Raw:
    """✓ learned / ✗ did not learn / ? no baseline — the one mark used in every table."""
    if learned is True:
        return Raw('<span class="mark ok" data-learned="true" title="beat the baseline">✓ learned</span>')
    if learned is False:
        return Raw('<span class="mark bad" data-learned="false" title="did not beat the baseline">'
                   '✗ did not learn</span>')
    return Raw('<span class="mark unknown" data-learned="null" title="no baseline to compare with">? unknown</span>')


def table(header: Iterable[Any], rows: Iterable[Iterable[Any]], cls: str = "") -> Raw:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            cells.append(f'<td class="r">{num(cell)}</td>' if numeric else f"<td>{esc(cell if isinstance(cell, Raw) else fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return Raw(f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def mapping_table(data: Any) -> Raw:
    """A generic object as a table: {k: v} two columns, {row: {col: v}} a matrix, [{...}] rows."""
    if isinstance(data, Mapping) and data and all(isinstance(v, Mapping) for v in data.values()):
        cols = list(dict.fromkeys(c for v in data.values() for c in v))
        return table([""] + cols, ([k] + [data[k].get(c) for c in cols] for k in data), "matrix")
    if isinstance(data, Mapping):
        return table(["key", "value"], ([k, v] for k, v in data.items()), "kv")
    if isinstance(data, list) and data and all(isinstance(v, Mapping) for v in data):
        cols = list(dict.fromkeys(c for v in data for c in v))
        return table(cols, ([v.get(c) for c in cols] for v in data), "matrix")
    if isinstance(data, str):
        return markdown(data)
    return Raw(f"<pre>{esc(json.dumps(data, indent=2, default=str))}</pre>")


_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"`([^`]+)`"), r"<code>\1</code>")]


def _inline(text: str) -> str:
    out = esc(text.strip())
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    return [c.replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def markdown(text: str) -> Raw:
    """The Markdown the experiments write: pipe tables, headings, paragraphs, fenced code."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append(f"<pre>{esc(chr(10).join(lines[i + 1:j]))}</pre>")
            i = j + 1
        elif line.strip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_md_table(block))
        elif line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 2)
            out.append(f"<h{level}>{_inline(line.lstrip('#'))}</h{level}>")
            i += 1
        elif line.strip():
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("|", "#", "```")):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
        else:
            i += 1
    return Raw("\n".join(out))


def _md_table(block: list[str]) -> str:
    rows = [_cells(line) for line in block]
    sep = len(rows) > 1 and all(re.fullmatch(r"\s*:?-{1,}:?\s*", c) for c in rows[1])
    align = ["r" if c.strip().endswith(":") and not c.strip().startswith(":") else "" for c in rows[1]] if sep else []
    header, body = (rows[0], rows[2:]) if sep else ([], rows)
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)

    def cell(k: int, c: str) -> str:
        klass = ' class="r"' if (k < len(align) and align[k]) or re.fullmatch(r"\s*[-+]?[\d.,]+%?\s*", c) else ""
        return f"<td{klass}>{_inline(c)}</td>"

    trs = "".join("<tr>" + "".join(cell(k, c) for k, c in enumerate(r)) + "</tr>" for r in body)
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<table class="md">{thead}<tbody>{trs}</tbody></table>'


def figure(plot: Plot, out_dir: Path, embed: bool = False) -> Raw:
    """An ``<img>`` of the PNG (relative to ``out_dir``, or a data URI) with a link to the SVG."""
    if embed:
        src = "data:image/png;base64," + base64.b64encode(plot.png.read_bytes()).decode("ascii")
    else:
        src = plot.png.relative_to(out_dir).as_posix()
    svg = plot.svg.relative_to(out_dir).as_posix()
    return Raw(f'<figure><img src="{esc(src)}" alt="{esc(plot.alt)}"><figcaption>{esc(plot.title)} · '
               f'<a href="{esc(svg)}">SVG</a> · <a href="{esc(plot.png.relative_to(out_dir).as_posix())}">PNG</a>'
               f"</figcaption></figure>")


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;margin:0;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
header.top{background:#1b2733;color:#fff;padding:14px 24px}header.top h1{margin:0;font-size:20px}
header.top .sub{color:#b8c4d0;font-size:12px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 18px;margin:14px 0}
h2{font-size:17px;margin:4px 0 10px}h3{font-size:14px;margin:12px 0 6px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{border-bottom:1px solid #e4e7eb;padding:3px 10px;text-align:left}
th{background:#f0f2f5;font-weight:600}td.r{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.card{border:1px solid #dde1e6;border-radius:6px;padding:6px 12px;min-width:110px;background:#fafbfc}
.card .k{font-size:11px;color:#5a6570;text-transform:uppercase;letter-spacing:.03em}.card .v{font-size:20px;font-weight:600}
.verdict{border-radius:6px;padding:10px 14px;font-size:16px;font-weight:600;margin:6px 0}
.verdict.ok{background:#e3f4e6;color:#14532d;border:1px solid #9bd3a7}
.verdict.bad{background:#fde8e8;color:#7f1d1d;border:2px solid #e07070}
.verdict.unknown{background:#f1f1f1;color:#444;border:1px solid #ccc}
.mark{font-weight:600;white-space:nowrap}.mark.ok{color:#15803d}.mark.bad{color:#b91c1c}.mark.unknown{color:#666}
.figs{display:flex;flex-wrap:wrap;gap:12px}figure{margin:4px 0}figure img{max-width:100%;height:auto;border:1px solid #eceff2}
figcaption{font-size:12px;color:#5a6570}.side{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.warn{color:#8a4b00;background:#fff6e5;border:1px solid #f0d49c;padding:4px 10px;border-radius:4px}
pre{background:#f4f5f7;padding:8px;overflow:auto;font-size:12px}details summary{cursor:pointer;color:#34495e}
nav a{margin-right:14px;color:#9fc3e6}a{color:#1f5f99}code{background:#f0f2f5;padding:0 3px}
"""


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: ``sections`` are ``(id, heading, inner HTML)``; a nav links to each."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(f'<section id="{esc(sid)}"><h2>{esc(head)}</h2>\n{inner}\n</section>' for sid, head, inner in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>"
            f'<header class="top"><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div><nav>{nav}</nav></header>'
            f"<main>\n{body}\n</main></body></html>\n")
