"""The sections of a run's page: result and verdict, curves, the experiment's tables beside the
paper's, memory, config (diff against the preset) and environment."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.report import plots
from loralab.report.html import Raw, esc, figure, learned_mark, mapping_table, markdown, num, table
from loralab.report.sources import RunData, config_diff, flatten

Section = tuple[str, str, str]
TRAIN_KEYS = ("train/loss", "train/lr", "train/tokens_per_s")
EVAL_LOSS_KEYS = ("eval/loss", "eval/eval_loss", "eval/val_loss")
"""The evaluation loss, drawn over the training loss (the first of these a run logs)."""
SHOWN_DETAILS = ("table", "paper", "memory", "peak_rss_mb")


@dataclass
class Out:
    """Where figures go and how the page refers to them; ``prefix`` keeps several pages' files apart."""

    dir: Path
    embed: bool = False
    prefix: str = ""

    def stem(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def figure(self, plot: plots.Plot) -> Raw:
        return figure(plot, self.dir, self.embed)


def curve(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the lines of ``metrics.jsonl`` that carry a numeric ``key``."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            step = row.get("step")
            xs.append(step if isinstance(step, (int, float)) else i)
            ys.append(float(value))
    return xs, ys


def metric_keys(runs: list[RunData], prefix: str) -> list[str]:
    keys = {k for run in runs for row in run.metrics for k, v in row.items()
            if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(keys, key=lambda k: (k not in TRAIN_KEYS, TRAIN_KEYS.index(k) if k in TRAIN_KEYS else 0, k))


def curve_panels(runs: list[RunData], labels: list[str]) -> dict[str, tuple[str, list[plots.Panel]]]:
    """Figures by stem: loss (train, with eval loss overlaid), lr, eval metrics, throughput, other train."""
    def panel(key: str, title: str, ylabel: str, extra: str | None = None) -> plots.Panel | None:
        series = []
        several = len(runs) > 1
        for index, (run, label) in enumerate(zip(runs, labels)):
            for k, suffix in ((key, ""), (extra, " (eval)")):
                xs, ys = curve(run.metrics, k) if k else ([], [])
                if xs:
                    series.append(plots.Series(label + suffix if several else k, xs, ys,
                                               color=index if several else None, dashed=several and bool(suffix)))
        return plots.Panel(title, ylabel, series) if series else None

    figures: dict[str, tuple[str, list[plots.Panel]]] = {}
    eval_keys = metric_keys(runs, "eval/")
    eval_loss = next((k for k in EVAL_LOSS_KEYS if k in eval_keys), None)
    evals = [k for k in eval_keys if k != eval_loss]
    others = [k for k in metric_keys(runs, "train/") if k not in TRAIN_KEYS]
    wanted = [("loss", "Loss", [("train/loss", "training loss", "loss", eval_loss)]),
              ("lr", "Learning rate", [("train/lr", "learning rate", "lr", None)]),
              ("eval", "Evaluation", [(k, k[5:], k[5:], None) for k in evals]),
              ("throughput", "Throughput", [("train/tokens_per_s", "training throughput", "tokens/s", None)]),
              ("train-other", "Other training metrics", [(k, k[6:], k[6:], None) for k in others])]
    for stem, title, specs in wanted:
        found = [p for p in (panel(k, t, y, e) for k, t, y, e in specs) if p is not None]
        if found:
            figures[stem] = (title, found)
    return figures


def peak_memory(results: dict[str, Any] | None) -> tuple[str, float] | None:
    """(label, MB) of the run's peak memory: ``details.peak_rss_mb`` or a ``peak*`` entry of ``details.memory``."""
    details = (results or {}).get("details") or {}
    if isinstance(details.get("peak_rss_mb"), (int, float)):
        return "peak RSS (MB)", float(details["peak_rss_mb"])
    memory = details.get("memory")
    if isinstance(memory, dict):
        for key, value in memory.items():
            if "peak" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                return key, float(value)
    return None


def verdict(results: dict[str, Any] | None, run: RunData) -> Raw:
    """The banner a reader sees first: learned or not, score against baseline."""
    if results is None:
        why = "the run failed (error.txt below)" if run.error else "the run is unfinished or was interrupted"
        return Raw(f'<div class="verdict bad" data-learned="missing">✗ No results.json: {esc(why)}</div>')
    metric = results.get("main_metric") or "score"
    score, learned = results.get("score"), results.get("learned")
    base = results.get("baseline") if isinstance(results.get("baseline"), dict) else None
    against = (f" vs baseline {num(base.get('score'), 'baseline')} ({esc(base.get('kind') or 'baseline')})"
               if base else " — no baseline measured")
    direction = "higher" if results.get("greater_is_better", True) else "lower"
    if learned is True:
        head, cls = "✓ Learned", "ok"
    elif learned is False:
        head, cls = "✗ Did not learn", "bad"
    else:
        head, cls = "? Learned: unknown", "unknown"
    margin = (f"; learning means beating it by more than {num(results['margin'], 'margin')} ({direction} is better)"
              if results.get("margin") is not None and base else "")
    return Raw(f'<div class="verdict {cls}" data-learned="{esc(json.dumps(learned))}">{head}: {esc(metric)} '
               f"{num(score, 'score')}{against}{margin if learned is not True else ''}</div>")


def cards(results: dict[str, Any] | None) -> Raw:
    results = results or {}
    items: list[tuple[str, Any, str]] = [(results.get("main_metric") or "score", results.get("score"), "score")]
    base = results.get("baseline")
    if isinstance(base, dict):
        items.append((f"baseline ({base.get('kind') or '?'})", base.get("score"), "baseline"))
    if results.get("margin") is not None:
        items.append(("margin", results["margin"], "margin"))
    for key, label in (("wall_seconds", "wall seconds"), ("tokens_per_second", "tokens/s")):
        if results.get(key) is not None:
            items.append((label, results[key], key))
    mem = peak_memory(results)
    if mem:
        items.append((mem[0], mem[1], "peak-memory"))
    params = results.get("params")
    if isinstance(params, dict) and params.get("trainable") is not None:
        items.append(("trainable params", params["trainable"], "trainable"))
        if params.get("total"):
            items.append(("trainable %", 100.0 * params["trainable"] / params["total"], "trainable-pct"))
    body = "".join(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{num(v, cls)}</div></div>'
                   for k, v, cls in items)
    return Raw(f'<div class="cards">{body}</div>')


def result_section(run: RunData, out: Out) -> Section:
    res = run.results
    parts = [verdict(res, run), cards(res)]
    parts += [f'<p class="warn">{esc(w)}</p>' for w in run.warnings]
    if res and isinstance(res.get("metrics"), dict) and res["metrics"]:
        parts.append("<h3>Final metrics</h3>" + table(["metric", "value"], sorted(res["metrics"].items()), "metrics"))
        base = res.get("baseline") if isinstance(res.get("baseline"), dict) else {}
        if base.get("metrics"):
            parts.append("<h3>Baseline metrics</h3>" + table(["metric", "value"], sorted(base["metrics"].items())))
    if run.error:
        parts.append(f"<h3>error.txt</h3><pre>{esc(run.error[-4000:])}</pre>")
    return (out.stem("result"), f"Result · {run.name}", "\n".join(parts))


def curves_section(run: RunData, out: Out) -> Section | None:
    figs = [out.figure(plots.panels_plot(panels, out.dir, out.stem(stem), title))
            for stem, (title, panels) in curve_panels([run], [run.name]).items()]
    if not figs:
        return None
    return (out.stem("curves"), "Curves", f'<div class="figs">{"".join(figs)}</div>')


def tables_section(run: RunData, out: Out) -> Section | None:
    details = (run.results or {}).get("details") or {}
    mine = details.get("table")
    paper = details.get("paper")
    memory = details.get("memory")
    rest = {k: v for k, v in details.items() if k not in SHOWN_DETAILS}
    if not (mine or paper or isinstance(memory, dict) or rest):
        return None
    side = []
    if mine:
        side.append(f'<div class="ours"><h3>This run</h3>{markdown(mine) if isinstance(mine, str) else mapping_table(mine)}</div>')
    if paper:
        side.append(f'<div class="paper"><h3>Paper</h3>{mapping_table(paper)}</div>')
    parts = [f'<div class="side">{"".join(side)}</div>'] if side else []
    if isinstance(memory, dict):
        parts.append("<h3>Memory</h3>" + mapping_table(memory))
        bars = {k: float(v) for k, v in flatten(memory).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if len(bars) >= 2:
            plot = plots.bar_plot(list(bars), list(bars.values()), out.dir, out.stem("memory"), "Memory", "as reported")
            parts.append(f'<div class="figs">{out.figure(plot)}</div>')
    if rest:
        parts.append("<details><summary>More details (results.json)</summary>"
                     + table(["key", "value"], sorted(flatten(rest).items()), "details") + "</details>")
    return (out.stem("tables"), "Experiment tables", "\n".join(parts))


def config_section(run: RunData, out: Out) -> Section:
    parts = []
    if run.preset_layer is not None:
        diff = config_diff(run.config, run.preset_layer)
        if diff:
            parts.append(f"<h3>Changed from preset {esc(run.preset)}</h3>"
                         + table(["key", f"preset {run.preset}", "this run"], diff, "diff"))
        else:
            parts.append(f"<p>Same as preset <code>{esc(run.preset)}</code> on every key it sets.</p>")
    elif run.preset:
        parts.append(f"<p>Preset <code>{esc(run.preset)}</code> (its layer is not known here: no diff).</p>")
    flat = flatten(run.config)
    if flat:
        headline = [k for k in ("experiment", "model.name", "data.task", "lora.method", "lora.r", "lora.alpha",
                                "train.lr", "train.max_steps", "train.batch_size", "train.seed") if k in flat]
        parts.append(table(["key", "value"], ([k, flat[k]] for k in headline), "config-head"))
        parts.append("<details><summary>Full resolved config</summary>"
                     + table(["key", "value"], sorted(flat.items()), "config") + "</details>")
    if run.env:
        env = {k: v for k, v in flatten(run.env).items() if k not in ("argv", "cwd")}
        parts.append("<details><summary>Environment</summary>" + table(["key", "value"], sorted(env.items())) + "</details>")
    parts.append(f"<p>Run directory: <code>{esc(run.path)}</code></p>")
    return (out.stem("config"), "Config", "\n".join(parts))


def run_sections(run: RunData, out: Out) -> list[Section]:
    found = [result_section(run, out), curves_section(run, out), tables_section(run, out), config_section(run, out)]
    return [s for s in found if s is not None]


def labels_for(runs: list[RunData]) -> list[str]:
    """Short unique names: the config's ``name`` when unique, else the directory name."""
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [r.path.name for r in runs]


def compare_sections(runs: list[RunData], out: Out) -> list[Section]:
    """Several runs: a summary table, overlaid curves, memory/throughput bars, the config difference."""
    labels = labels_for(runs)
    rows = []
    for label, run in zip(labels, runs):
        res = run.results or {}
        base = res.get("baseline") if isinstance(res.get("baseline"), dict) else {}
        mem = peak_memory(res)
        rows.append([label, res.get("main_metric"), res.get("score"), base.get("score"), learned_mark(res.get("learned")),
                     res.get("tokens_per_second"), mem[1] if mem else None, res.get("wall_seconds")])
    summary = table(["run", "metric", "score", "baseline", "learned", "tokens/s", "peak MB", "wall s"], rows, "runs")
    figs = [out.figure(plots.panels_plot(panels, out.dir, out.stem(f"overlay-{stem}"), title))
            for stem, (title, panels) in curve_panels(runs, labels).items()]
    for key, stem, title, unit in (("peak", "bars-memory", "Peak memory", "MB"),
                                   ("tokens_per_second", "bars-throughput", "Throughput", "tokens/s")):
        pairs = [(l, v) for l, v in ((l, _headline(r, key)) for l, r in zip(labels, runs)) if v is not None]
        if len(pairs) >= 2:
            figs.append(out.figure(plots.bar_plot([p[0] for p in pairs], [p[1] for p in pairs], out.dir,
                                                  out.stem(stem), title, unit)))
    flats = [flatten(r.config) for r in runs]
    differ = [k for k in sorted({k for f in flats for k in f})
              if k != "out_dir" and len({_canon(f, k) for f in flats}) > 1]
    diff = (table(["key"] + labels, ([k] + [f.get(k) for f in flats] for k in differ), "config-diff")
            if differ else Raw("<p>The runs' configs are the same.</p>"))
    return [(out.stem("compare"), f"{len(runs)} runs compared", summary + f'<div class="figs">{"".join(figs)}</div>'),
            (out.stem("config-diff"), "Config difference", diff)]


def _headline(run: RunData, key: str) -> float | None:
    if key == "peak":
        mem = peak_memory(run.results)
        return mem[1] if mem else None
    value = (run.results or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _canon(flat: dict[str, Any], key: str) -> str:
    return json.dumps(flat[key], sort_keys=True, default=str) if key in flat else "\0unset"
