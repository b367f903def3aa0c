"""The E2E table: every method's runs (median over seeds) beside the un-adapted model and the paper's rows.

Columns are the five official metrics (BLEU, METEOR, ROUGE-L in percent; NIST and CIDEr as they come),
the trainable parameters and the training time. Runs are grouped by (model, method, settings): runs that
differ in their recipe are never pooled. A row whose runs did not clearly beat the un-adapted model's BLEU
(the result schema's ``learned``) is marked "✗ at baseline": a failed run, never agreement with the
paper. The paper's rows are Hu et al. 2021, Table 3 (GPT-2 Medium; * rows quoted from earlier work).

    loralab e2e-table RUNS_DIR [--out DIR]     writes e2e_table.md and e2e_table.json
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from loralab.tasks.common.tables import collect_results, write_table_files

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
PERCENT = ("BLEU", "METEOR", "ROUGE_L")
PAPER_ROWS: dict[str, list[tuple[str, str, tuple[float, ...]]]] = {
    # our method: [(the paper's row, trainable parameters, (BLEU, NIST, METEOR, ROUGE-L, CIDEr))]
    "lora": [("paper: GPT-2 M LoRA", "0.35M", (70.4, 8.85, 46.8, 71.8, 2.53))],
    "full": [("paper: GPT-2 M FT*", "354.92M", (68.2, 8.62, 46.2, 71.0, 2.47))],
    "adapter_l": [("paper: GPT-2 M Adapter^L*", "0.37M", (66.3, 8.41, 45.0, 69.8, 2.40)),
                  ("paper: GPT-2 M Adapter^L*", "11.09M", (68.9, 8.71, 46.1, 71.3, 2.47))],
    "adapter_h": [("paper: GPT-2 M Adapter^H", "11.09M", (67.3, 8.50, 46.0, 70.7, 2.44))],
    "ft_top2": [("paper: GPT-2 M FT^Top2*", "25.19M", (68.1, 8.59, 46.0, 70.8, 2.41))],
    "prefix_layer": [("paper: GPT-2 M PreLayer*", "0.35M", (69.7, 8.81, 46.1, 71.4, 2.49))],
}
"""Hu et al. 2021, Table 3 (E2E NLG test set). adapter_p, bitfit and prefix_embed have no E2E row there."""
SETTINGS = ("lr", "epochs", "max_steps", "batch_size", "r", "train_samples", "eval_samples", "num_beams")


def flatten(result: dict, run_dir: Path) -> dict[str, Any]:
    """One E2E run's ``results.json`` and ``config.yaml`` as a table row."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    lora, train, data, gen = (cfg.get(k, {}) for k in ("lora", "train", "data", "generate"))
    details, baseline = result.get("details", {}), result.get("baseline") or {}
    return {"model": cfg.get("model", {}).get("name"), "method": lora.get("method"), "seed": train.get("seed"),
            "metrics": result.get("metrics", {}), "baseline": baseline.get("metrics") or {},
            "learned": result.get("learned"), "trainable_params": result.get("params", {}).get("trainable"),
            "fit": details.get("fit"), "eval_mrs": details.get("eval_mrs"), "run_dir": str(run_dir),
            "settings": {"lr": train.get("lr"), "epochs": train.get("epochs"), "max_steps": train.get("max_steps"),
                         "batch_size": train.get("batch_size"),
                         "r": lora.get("r") if str(lora.get("method", "")).startswith(("lora", "adapter")) else None,
                         "train_samples": data.get("train_samples"), "eval_samples": data.get("eval_samples"),
                         "num_beams": gen.get("num_beams")}}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _shown(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" if key in PERCENT else f"{value:.2f}"


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (model, method, settings): the median of each metric over its seeds, and the counts."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["model"], r["method"], json.dumps(r["settings"], sort_keys=True))].append(r)
    rows = []
    for (model, method, settings), runs in groups.items():
        train_s = [(r.get("fit") or {}).get("train_seconds") for r in runs]
        rows.append({"model": model, "method": method, "settings": json.loads(settings), "n": len(runs),
                     "seeds": sorted(r.get("seed") for r in runs), "learned": sum(bool(r.get("learned")) for r in runs),
                     "trainable_params": runs[0].get("trainable_params"), "eval_mrs": runs[0].get("eval_mrs"),
                     "train_seconds": _median(train_s),
                     "metrics": {k: _median([r["metrics"].get(k) for r in runs]) for k in METRICS},
                     "bleu_spread": [min(r["metrics"]["BLEU"] for r in runs), max(r["metrics"]["BLEU"] for r in runs)],
                     "baseline": {k: _median([r["baseline"].get(k) for r in runs]) for k in METRICS}})
    return rows


def e2e_table(results: list[dict]) -> tuple[str, dict]:
    """Markdown table and JSON-ready dict of finished E2E runs beside the baseline and the paper."""
    if not results:
        raise ValueError("e2e_table needs at least one finished E2E result")
    rows = aggregate(results)
    head = ["model / method", "trainable", "seeds", "BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        mark = f" ✗ at baseline ({row['n'] - row['learned']}/{row['n']})" if row["learned"] < row["n"] else ""
        lo, hi = row["bleu_spread"]
        bleu = _shown("BLEU", row["metrics"]["BLEU"]) + (f" ({100 * lo:.1f}–{100 * hi:.1f})" if row["n"] > 1 else "")
        lines.append("| " + " | ".join([
            f"{row['model']} / {row['method']}", f"{row['trainable_params']:,}" if row["trainable_params"] else "?",
            str(row["n"]), bleu + mark, *(_shown(k, row["metrics"][k]) for k in METRICS[1:]),
            f"{row['train_seconds']:.0f}" if row["train_seconds"] is not None else "?"]) + " |")
    for model in dict.fromkeys(r["model"] for r in rows):  # one baseline row per base model
        base = next(r["baseline"] for r in rows if r["model"] == model)
        lines.append("| " + " | ".join([f"baseline: {model} un-adapted", "0", "—", *(_shown(k, base[k]) for k in METRICS),
                                       "—"]) + " |")
    methods = ["lora"] + [m for m in dict.fromkeys(r["method"] for r in rows) if m != "lora"]
    paper = [row for m in methods for row in PAPER_ROWS.get(m, [])]
    for label, trainable, scores in paper:
        lines.append("| " + " | ".join([label, trainable, "—", *(f"{v:.1f}" if k in PERCENT else f"{v:.2f}"
                                                                 for k, v in zip(METRICS, scores)), "—"]) + " |")
    no_row = [m for m in methods if m not in PAPER_ROWS]
    mrs = sorted({r["eval_mrs"] for r in rows if r["eval_mrs"]})
    note = (f"Median over seeds; BLEU (min–max) when several. Scored on {', '.join(map(str, mrs)) or '?'} test MRs "
            "(the paper: all 630). ✗ at baseline (k/n): k of n runs did not clearly beat the un-adapted model's "
            "BLEU (learned: false), a failed run. Paper rows: Hu et al. 2021 Table 3, GPT-2 Medium (* quoted from "
            "earlier work)." + (f" The paper has no E2E row for {', '.join(no_row)}." if no_row else ""))
    data = {"metrics": list(METRICS), "rows": rows,
            "paper_rows": [{"label": label, "trainable": t, "scores": dict(zip(METRICS, s))} for label, t, s in paper]}
    return "\n".join(lines) + "\n\n" + note + "\n", data


def write_e2e_table(results: list[dict], out_dir: str | Path, stem: str = "e2e_table") -> tuple[Path, Path]:
    """Print the table and write ``<stem>.md`` and ``<stem>.json`` under ``out_dir``."""
    return write_table_files(*e2e_table(results), out_dir, stem)


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Finished E2E training runs under ``root`` (the registry's, else every results.json below it)."""
    return collect_results(root, "e2e", flatten)
