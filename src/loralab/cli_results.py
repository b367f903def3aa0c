"""The ``loralab`` commands that read what runs wrote: ``runs``, ``models``, ``glue-table``, ``e2e-table``,
``score-e2e``. Like the rest of the CLI they only parse and call library functions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from loralab.cli_parser import UsageError
from loralab.engine.runs import compare_runs, format_table, get_run, list_runs


def _brief(results: dict) -> tuple[str, str, str]:
    """(score, baseline, learned) columns of a registry row's headline metrics."""
    score, base, learned = results.get("score"), results.get("baseline.score"), results.get("learned")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"  # noqa: E731
    return fmt(score), fmt(base), {True: "yes", False: "NO", None: "-"}.get(learned, "-")


def cmd_runs(args: argparse.Namespace) -> int:
    root = Path(args.root)
    try:
        if args.runs_command == "list":
            rows = [[r.id[:8], r.created, r.status, r.name, r.experiment, r.model, r.task, *_brief(r.metrics)]
                    for r in list_runs(root)]
            print(format_table(["id", "created", "status", "name", "experiment", "model", "task", "score",
                                "baseline", "learned"], rows) if rows else f"no runs in {root}")
        elif args.runs_command == "show":
            r = get_run(root, args.id)
            for key in ("id", "name", "status", "experiment", "model", "task", "created", "finished", "dir"):
                print(f"{key:10s} {getattr(r, key)}")
            results = r.dir / "results.json"
            if results.exists():
                print("results:\n" + results.read_text().rstrip())
            if r.error:
                print("error:\n" + r.error.rstrip())
        else:
            if len(args.ids) < 2:
                raise UsageError("runs compare needs at least two run ids")
            print(compare_runs(root, args.ids))
    except KeyError as err:
        raise UsageError(err.args[0]) from None
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import dataclasses

    from loralab.models import zoo

    rows = [dataclasses.asdict(m) if dataclasses.is_dataclass(m) else dict(m) for m in zoo.list_models()]
    keys = list(dict.fromkeys(k for m in rows for k in m))
    print(format_table(keys, [[m.get(k) for k in keys] for m in rows]))
    return 0


def _table(args: argparse.Namespace, what: str, collect: Any, write: Any) -> int:
    if not Path(args.runs_dir).is_dir():
        raise UsageError(f"{args.runs_dir}: no such directory")
    results = collect(args.runs_dir)
    if not results:
        raise UsageError(f"no finished {what} runs under {args.runs_dir}")
    write(results, args.out or args.runs_dir)
    return 0


def cmd_glue_table(args: argparse.Namespace) -> int:
    from loralab.tasks.glue import table

    return _table(args, "GLUE", table.collect_results, table.write_glue_table)


def cmd_e2e_table(args: argparse.Namespace) -> int:
    from loralab.tasks.e2e import table

    return _table(args, "E2E", table.collect, table.write_e2e_table)


def cmd_score_e2e(args: argparse.Namespace) -> int:
    from loralab.metrics.e2e import score_files

    for path in (args.hyp, args.ref):
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such file")
    scores = score_files(args.hyp, args.ref)  # a count mismatch is a ValueError: the files are wrong
    # one JSON object (raw values, BLEU as a fraction), as the official scorer's consumers expect
    print(format_table(["metric", "value"], list(scores.items())) if args.table else json.dumps(scores))
    return 0
