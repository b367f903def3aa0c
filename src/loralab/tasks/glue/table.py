"""The GLUE table: this run's median over seeds beside the baseline and the paper's numbers.

Each cell is the median over seeds of the task's main metric, x100, with the spread (min-max) and
the number of seeds: the paper reports the median of 5 runs (Hu et al. 2021, Table 2). MNLI is the
matched dev set, CoLA Matthews correlation, STS-B Pearson, the rest accuracy. "Avg" averages the
columns shown, and the paper's row is averaged over the same columns, so the two stay comparable.
A baseline row gives the majority class (STS-B: a constant predictor) on the same dev sets, and a
cell whose runs did not clearly beat it is marked "✗ at baseline": a failed run, never agreement.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from loralab.metrics.glue import MAIN_METRIC, median_and_spread, normalize_task_name

TASK_ORDER = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]
TASK_TITLES = {"mnli": "MNLI", "sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "qnli": "QNLI",
               "qqp": "QQP", "rte": "RTE", "stsb": "STS-B"}
def _scores(*values: float) -> dict[str, float]:
    return dict(zip(TASK_ORDER, values))


PAPER_ROBERTA_BASE_LORA = _scores(87.5, 95.1, 89.7, 63.4, 93.3, 90.8, 86.6, 91.5)
"""Hu et al. 2021, Table 2, RoBERTa-base + LoRA (0.3M trainable parameters), median of 5 seeds."""
PAPER_LABEL = "paper: RoBERTa-base LoRA (Hu et al. 2021)"
PAPER_ROWS: dict[str, list[tuple[str, str, dict[str, float]]]] = {
    # our method: [(the paper's row, its trainable parameters, scores in TASK_ORDER)], Hu et al. 2021 Table 2.
    # * rows are the paper's quotes of earlier work; † rows are RoBERTa-large in Houlsby/Pfeiffer's setup
    # (the paper's only adapter^H/adapter^P rows: there is no RoBERTa-base one).
    "lora": [(PAPER_LABEL, "0.3M", PAPER_ROBERTA_BASE_LORA),
             ("paper: RoBERTa-large LoRA† (Hu et al. 2021)", "0.8M", _scores(90.6, 96.2, 90.2, 68.2, 94.8, 91.6, 85.2, 92.3))],
    "full": [("paper: RoBERTa-base FT*", "125.0M", _scores(87.6, 94.8, 90.2, 63.6, 92.8, 91.9, 78.7, 91.2))],
    "bitfit": [("paper: RoBERTa-base BitFit*", "0.1M", _scores(84.7, 93.7, 92.7, 62.0, 91.8, 84.0, 81.5, 90.8))],
    "adapter_h": [("paper: RoBERTa-large Adapter^H† (r=8)", "0.8M", _scores(90.3, 96.3, 87.7, 66.3, 94.7, 91.5, 72.9, 91.5)),
                  ("paper: RoBERTa-large Adapter^H† (r=64)", "6.0M", _scores(89.9, 96.2, 88.7, 66.5, 94.7, 92.1, 83.4, 91.0))],
    "adapter_p": [("paper: RoBERTa-large Adapter^P† (r=16)", "0.8M", _scores(90.5, 96.6, 89.7, 67.8, 94.8, 91.7, 80.1, 91.9)),
                  ("paper: RoBERTa-large Adapter^P† (r=64)", "3.0M", _scores(90.2, 96.1, 90.2, 68.3, 94.8, 91.9, 83.8, 92.1))],
    "adapter_d": [  # AdapterDrop; not a loralab method: shown beside any adapter method
                  ("paper: RoBERTa-base Adapter^D* (0.3M)", "0.3M", _scores(87.1, 94.2, 88.5, 60.8, 93.1, 90.2, 71.5, 89.7)),
                  ("paper: RoBERTa-base Adapter^D* (0.9M)", "0.9M", _scores(87.3, 94.7, 88.4, 62.6, 93.0, 90.6, 75.9, 90.3))],
}
"""The paper's GLUE rows per method. adapter_l, prefix_layer, prefix_embed and ft_top2 have none: Hu et al.
compare them on GPT-2 / GPT-3 only (Tables 3-4)."""
RESULT_FILE = "results.json"


def result_score(result: dict) -> float:
    """The main metric of one run's result (``result["metrics"][MAIN_METRIC[task]]``), x100."""
    task = normalize_task_name(result["task"])
    key = result.get("main_metric") or MAIN_METRIC[task]
    if key not in result.get("metrics", {}):
        raise KeyError(f"GLUE result for {task} (run {result.get('run_dir', '?')}) has no metric {key!r}; "
                       f"it has {sorted(result.get('metrics', {}))}")
    return 100.0 * float(result["metrics"][key])


SETTINGS = ("lr", "epochs", "max_steps", "batch_size", "r", "alpha", "train_samples", "max_length", "init_from")
"""Hyperparameters recorded per run; runs that differ in them are never pooled into one median."""


def _settings_key(result: dict) -> str:
    return json.dumps({k: result.get("settings", {}).get(k) for k in SETTINGS}, sort_keys=True)


def aggregate(results: list[dict]) -> list[dict]:
    """Group runs by (model, method, task, settings) and summarise the seeds: median, min, max, std, n,
    values. When one (model, method, task) was run with several settings, each group gets a
    ``variant`` naming the settings that differ (e.g. "lr=0.002"), so it shows as its own row."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for res in results:
        key = (res.get("model", "?"), res.get("method", "?"), normalize_task_name(res["task"]), _settings_key(res))
        groups[key].append(res)
    variants: dict[tuple, list[str]] = defaultdict(list)
    for model, method, task, settings in groups:
        variants[(model, method, task)].append(settings)
    rows = []
    for (model, method, task, settings), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        values = [result_score(r) for r in runs]
        baselines = [100.0 * r["baseline"] for r in runs if r.get("baseline") is not None]
        siblings = [json.loads(s) for s in variants[(model, method, task)]]
        mine = json.loads(settings)
        differing = [k for k in SETTINGS if len({json.dumps(s.get(k)) for s in siblings}) > 1]
        rows.append({"model": model, "method": method, "task": task, "metric": MAIN_METRIC[task],
                     "variant": ", ".join(f"{k}={mine.get(k)}" for k in differing),
                     **median_and_spread(values), "values": values, "seeds": [r.get("seed") for r in runs],
                     "settings": mine, "trainable_params": runs[0].get("trainable_params"),
                     "baseline": sorted(baselines)[len(baselines) // 2] if baselines else None,
                     "learned": sum(bool(r.get("learned")) for r in runs)})
    return rows


def _fmt_cell(agg: dict) -> str:
    text = f"{agg['median']:.1f}" if agg["n"] == 1 else f"{agg['median']:.1f} ({agg['min']:.1f}–{agg['max']:.1f}, n={agg['n']})"
    if agg["baseline"] is not None and agg["learned"] < agg["n"]:
        text += f" ✗ at baseline ({agg['n'] - agg['learned']}/{agg['n']})"
    return text


def glue_table(results: list[dict]) -> tuple[str, dict]:
    """Markdown table and JSON-ready dict of finished GLUE runs beside the paper's numbers."""
    if not results:
        raise ValueError("glue_table needs at least one finished GLUE result")
    summary = aggregate(results)
    tasks = [t for t in TASK_ORDER if any(s["task"] == t for s in summary)]
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for s in summary:
        rows[(s["model"], s["method"], s["variant"])][s["task"]] = s
    header = ["model / method", "trainable"] + [TASK_TITLES[t] for t in tasks] + ["Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    json_rows = []
    for (model, method, variant), cells in rows.items():
        medians = {t: cells[t]["median"] for t in tasks if t in cells}
        avg = sum(medians.values()) / len(medians) if len(medians) == len(tasks) else None
        trainable = next((c["trainable_params"] for c in cells.values() if c["trainable_params"]), None)
        lines.append("| " + " | ".join(
            [f"{model} / {method}" + (f" ({variant})" if variant else ""), f"{trainable:,}" if trainable else "?"]
            + [_fmt_cell(cells[t]) if t in cells else "—" for t in tasks]
            + [f"{avg:.1f}" if avg is not None else "—"]) + " |")
        json_rows.append({"model": model, "method": method, "variant": variant, "trainable_params": trainable, "avg": avg,
                          "tasks": {t: cells[t] for t in tasks if t in cells}})
    base = {t: next((s["baseline"] for s in summary if s["task"] == t and s["baseline"] is not None), None)
            for t in tasks}
    if any(v is not None for v in base.values()):
        lines.append("| " + " | ".join(["baseline: majority class (STS-B: constant)", "0"]
                                       + [f"{base[t]:.1f}" if base[t] is not None else "—" for t in tasks]
                                       + ["—"]) + " |")
    shown_methods = ["lora"] + [m for m in dict.fromkeys(s["method"] for s in summary) if m != "lora"]
    if any(m.startswith("adapter_") for m in shown_methods):
        shown_methods.append("adapter_d")  # the paper's only RoBERTa-base adapter rows
    paper_rows = [row for m in shown_methods for row in PAPER_ROWS.get(m, [])]
    for label, trainable, scores in paper_rows:
        avg = sum(scores[t] for t in tasks) / len(tasks)
        lines.append("| " + " | ".join([label, trainable] + [f"{scores[t]:.1f}" for t in tasks] + [f"{avg:.1f}"]) + " |")
    paper_avg = sum(PAPER_ROBERTA_BASE_LORA[t] for t in tasks) / len(tasks)
    no_row = [m for m in shown_methods if m not in PAPER_ROWS]
    note = ("Median over seeds x100 (min–max, n seeds). MNLI: matched acc; CoLA: Matthews corr; STS-B: "
            "Pearson; others: accuracy. Avg over the columns shown (a row missing a column has none). "
            "✗ at baseline (k/n): k of the n runs did not clearly beat the baseline row (learned: false); "
            "such a cell is a failed run, not agreement with the paper. Paper rows: Hu et al. 2021 Table 2 "
            "(* quoted from earlier work; † RoBERTa-large in Houlsby et al.'s setup)."
            + (f" The paper has no GLUE row for {', '.join(no_row)} (compared on GPT-2/GPT-3 only)." if no_row else ""))
    markdown = "\n".join(lines) + "\n\n" + note + "\n\n" + _runs_table(results) + "\n"
    data = {"tasks": tasks, "metrics": {t: MAIN_METRIC[t] for t in tasks}, "rows": json_rows, "baseline": base,
            "paper": {"label": PAPER_LABEL, "scores": {t: PAPER_ROBERTA_BASE_LORA[t] for t in tasks},
                      "avg": paper_avg},
            "paper_rows": [{"label": label, "trainable": trainable, "scores": {t: scores[t] for t in tasks}}
                           for label, trainable, scores in paper_rows]}
    return markdown, data


def _runs_table(results: list[dict]) -> str:
    """One line per run: its score, trainable parameters, training time and throughput."""
    lines = ["| task | method | seed | score | baseline | learned | trainable | train time (s) | tokens/s | run |",
             "|" + "---|" * 10]
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    for r in sorted(results, key=lambda r: (order.get(normalize_task_name(r["task"]), 99), r.get("method", ""))):
        fit = r.get("fit") or {}
        secs, tps = fit.get("train_seconds"), fit.get("tokens_per_second")
        lines.append("| " + " | ".join([
            TASK_TITLES.get(normalize_task_name(r["task"]), r["task"]), str(r.get("method", "?")), str(r.get("seed", "?")),
            f"{result_score(r):.1f}", f"{100 * r['baseline']:.1f}" if r.get("baseline") is not None else "—",
            {True: "yes", False: "NO"}.get(r.get("learned"), "—"),
            f"{r['trainable_params']:,}" if r.get("trainable_params") else "?",
            f"{secs:.0f}" if secs is not None else "?", f"{tps:,.0f}" if tps else "?",
            Path(str(r.get("run_dir", "?"))).name]) + " |")
    return "\n".join(lines)


def write_glue_table(results: list[dict], out_dir: str | Path, stem: str = "glue_table") -> tuple[Path, Path]:
    """Print the table and write ``<stem>.md`` and ``<stem>.json`` under ``out_dir``."""
    from loralab.tasks.common.tables import write_table_files

    return write_table_files(*glue_table(results), out_dir, stem)


def flatten(result: dict, run_dir: Path) -> dict[str, Any]:
    """One run's ``results.json`` (the common schema) and its ``config.yaml`` as the table's row."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    lora, train, data = cfg.get("lora", {}), cfg.get("train", {}), cfg.get("data", {})
    details, baseline = result.get("details", {}), result.get("baseline") or {}
    is_lora = lora.get("method") == "lora"
    return {"task": details.get("task", data.get("task")), "seed": train.get("seed"), "model": cfg.get("model", {}).get("name"),
            "method": lora.get("method"), "main_metric": result.get("main_metric"), "metrics": result.get("metrics", {}),
            "baseline": baseline.get("score"), "learned": result.get("learned"),
            "trainable_params": result.get("params", {}).get("trainable"), "fit": details.get("fit"),
            "run_dir": str(run_dir),
            "settings": {"lr": train.get("lr"), "epochs": train.get("epochs"), "max_steps": train.get("max_steps"),
                         "batch_size": train.get("batch_size"), "r": lora.get("r") if is_lora else None,
                         "alpha": lora.get("lora_alpha") if is_lora else None,
                         "train_samples": data.get("train_samples"), "max_length": data.get("max_length"),
                         "init_from": lora.get("init_from")}}


def collect_results(root: str | Path) -> list[dict[str, Any]]:
    """Finished GLUE training runs under ``root`` as table rows (``common.tables.collect_results``;
    evaluation-only runs are left out, so that re-evaluating an adapter never counts as another seed)."""
    from loralab.tasks.common.tables import collect_results as collect

    return collect(root, "glue", flatten)


def main(argv: list[str] | None = None) -> int:
    """python -m loralab.tasks.glue.table RUNS_DIR [--out DIR]: the table of the finished runs there
    (train them with ``loralab sweep --preset glue-cpu-rte --seeds 0,1,2,3,4 --out DIR``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loralab.tasks.glue.table", description=main.__doc__)
    parser.add_argument("runs_dir")
    parser.add_argument("--out", help="where glue_table.md/.json go (default: RUNS_DIR)")
    args = parser.parse_args(argv)
    results = collect_results(args.runs_dir)
    if not results:
        print(f"no finished GLUE runs under {args.runs_dir}")
        return 1
    write_glue_table(results, args.out or args.runs_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
