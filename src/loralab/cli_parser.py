"""The ``loralab`` argument parser; the help of the config keys comes from the schema's docstrings."""

from __future__ import annotations

import argparse
from typing import Any

from loralab.engine.config import config_help


class UsageError(Exception):
    """Bad command-line use; exit code 2."""


def build_parser(commands: Any) -> argparse.ArgumentParser:
    """The parser; ``commands`` holds the ``cmd_*`` functions (of cli and cli_results)."""
    parser = argparse.ArgumentParser(prog="loralab", description="LoRA and QLoRA fine-tuning you can trust.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    schema = "configuration keys (YAML sections or dotted key=value overrides):\n\n" + config_help()

    p = sub.add_parser("train", help="train a run", formatter_class=raw, epilog=schema,
                       description="loralab train [CONFIG.yaml] [--preset NAME] [key=value ...]\n"
                                   "Layers: defaults -> preset -> CONFIG.yaml -> key=value overrides.")
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    p.add_argument("--preset", help="named set of overrides (see `loralab config --presets`)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--run-dir", metavar="DIR", help="run in exactly DIR: create it, or finish what a previous "
                                                    "process left there (used by `loralab sweep`)")
    p.add_argument("--baseline-cache", metavar="DIR", help="reuse an un-adapted baseline that a run "
                   "with the same model, data, generate settings and seed measured into DIR (used by `loralab sweep`)")
    p.add_argument("--quiet", action="store_true", help="no progress output (same as train.quiet=true)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, build the model and method, "
                                                          "print the trainable/total counts by kind (JSON); no training")
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("sweep", help="a grid of runs over keys and seeds, resumable, with its table",
                       formatter_class=raw,
                       description="loralab sweep [CONFIG.yaml] --preset P [key=value ...] [key=v1,v2,...] "
                                   "[--seeds 0,1,2] [--jobs N] --out DIR\n"
                                   "loralab sweep --sweep NAME [key=value ...] [--jobs N] --out DIR")
    p.add_argument("items", nargs="*", metavar="key=value | key=v1,v2")
    p.add_argument("--preset")
    p.add_argument("--sweep", metavar="NAME", help="a named sweep (e2e-rank, glue-rank-sst2, ...): its preset, grid, "
                   "seeds and the paper's numbers to print beside the points")
    p.add_argument("--seeds", help="comma-separated train.seed values (default: 0, or the named sweep's)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once; the CPU threads are split between them")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=commands.cmd_sweep)

    p = sub.add_parser("eval", help="evaluate an adapter (run dir or adapter dir)", formatter_class=raw,
                       epilog=schema)
    p.add_argument("target", metavar="RUN_DIR|ADAPTER_DIR|CONFIG.yaml")
    p.add_argument("items", nargs="*", metavar="key=value")
    p.add_argument("--adapter", metavar="DIR", help="adapter dir (default: the run's adapter)")
    p.add_argument("--preset")
    p.add_argument("--base-only", action="store_true", help="evaluate the base model without any adapter")
    p.add_argument("--allow-fresh-head", action="store_true",
                   help="evaluate even when the adapter lacks this model's head (a freshly initialised one is used)")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser("merge", help="merge an adapter into its base and save a Hugging Face model dir")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--preset")
    p.add_argument("--allow-fresh-head", action="store_true",
                   help="merge even when the adapter lacks its head (a freshly initialised one is saved)")
    p.set_defaults(func=commands.cmd_merge)

    p = sub.add_parser("runs", help="list, show or compare runs")
    p.add_argument("--root", default="runs", help="run root holding runs.sqlite (default: runs)")
    runs_sub = p.add_subparsers(dest="runs_command", required=True, metavar="list|show|compare")
    runs_sub.add_parser("list", help="all runs")
    runs_sub.add_parser("show", help="one run").add_argument("id", help="run id or prefix")
    runs_sub.add_parser("compare", help="runs side by side").add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=commands.cmd_runs)

    sub.add_parser("models", help="list the offline model zoo").set_defaults(func=commands.cmd_models)

    p = sub.add_parser("glue-table", help="the GLUE table of finished runs beside the baseline and the paper")
    p.add_argument("runs_dir", metavar="RUNS_DIR")
    p.add_argument("--out", help="where glue_table.md/.json go (default: RUNS_DIR)")
    p.set_defaults(func=commands.cmd_glue_table)

    p = sub.add_parser("e2e-table", help="the E2E table of finished runs (every method) beside the baseline and the paper")
    p.add_argument("runs_dir", metavar="RUNS_DIR")
    p.add_argument("--out", help="where e2e_table.md/.json go (default: RUNS_DIR)")
    p.set_defaults(func=commands.cmd_e2e_table)

    p = sub.add_parser("score-e2e", help="score E2E NLG outputs against references (BLEU, NIST, METEOR, ...)")
    p.add_argument("hyp", metavar="HYP")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default)")
    p.add_argument("--table", action="store_true", help="print a table instead of JSON")
    p.set_defaults(func=commands.cmd_score_e2e)

    p = sub.add_parser("score-squad", help="official SQuAD v1.1 exact match and F1 of a predictions file")
    p.add_argument("dataset", metavar="DATASET.json")
    p.add_argument("predictions", metavar="PREDICTIONS.json", help="{question id: answer}")
    p.set_defaults(func=commands.cmd_score_squad)

    p = sub.add_parser("analyze", help="the paper's analyses: subspace similarity, delta-w (see analyze --help)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=commands.cmd_analyze)

    p = sub.add_parser("report", help="an HTML report of runs, sweeps or analyses (see report --help)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=commands.cmd_report)

    p = sub.add_parser("quickstart", help="the main job on an offline default (preset 'quickstart')")
    p.add_argument("items", nargs="*", metavar="key=value")
    p.set_defaults(func=commands.cmd_quickstart)

    p = sub.add_parser("config", help="print the resolved config (or the documented schema)",
                       formatter_class=raw, epilog=schema)
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    p.add_argument("--preset")
    p.add_argument("--schema", action="store_true", help="every key with its type, default and doc")
    p.add_argument("--presets", action="store_true", help="the registered presets, one line each")
    p.add_argument("--out", metavar="FILE", help="also save the resolved config to FILE")
    p.set_defaults(func=commands.cmd_config)
    return parser
