"""``loralab`` command line. It only parses: the work is done by engine functions it calls.

Exit codes: 0 ok; 2 a usage, configuration or input error (one line ``loralab <cmd>: error: ...``
naming the thing and the fix, no traceback); 1 a bug (traceback, and a request to report it);
130 interrupted (Ctrl-C / SIGTERM, after a checkpoint). ``LORALAB_DEBUG=1`` shows every traceback.
Experiments and the trainer are imported only when a command needs them, so ``--help``,
``config`` and ``runs`` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from loralab import cli_results
from loralab.cli_parser import UsageError, build_parser
from loralab.engine.config import (ConfigError, config_help, config_to_yaml_with_docs, list_presets, load_config,
                                   save_config)
from loralab.engine.runs import format_table


# ---------------------------------------------------------------- helpers


def _split_items(items: list[str], allow_config: bool = True) -> tuple[str | None, list[str]]:
    """Positional words -> (CONFIG.yaml or None, [key=value overrides])."""
    config, overrides = None, []
    for item in items:
        if "=" in item and not item.startswith("-"):
            overrides.append(item)
        elif allow_config and config is None and not item.startswith("-"):
            config = item
        else:
            raise UsageError(f"unexpected argument {item!r}; expected [CONFIG.yaml] and key=value overrides")
    return config, overrides


def _find_adapter(run_dir: Path, fix: str = "pass --adapter DIR") -> Path:
    """The adapter of a run dir: the dir itself, best/, final/, adapter/, else the only one inside."""
    for candidate in (run_dir, run_dir / "best", run_dir / "final", run_dir / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    found = sorted(p.parent for p in run_dir.rglob("adapter_config.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"no adapter (adapter_config.json) under {run_dir}; {fix}")
    raise UsageError(f"several adapters under {run_dir} ({', '.join(map(str, found[:4]))}); {fix}")


def _config_near(adapter_dir: Path) -> Path | None:
    for d in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def _print_summary(run: Any, results: dict, report: bool = False) -> None:
    """A few lines a person reads: the score beside its baseline, learned or not, time, where things are."""
    print(f"run {run.id[:8]} completed: {run.dir}")
    if "score" not in results:
        return
    base = results.get("baseline") or {}
    direction = "higher" if results.get("greater_is_better", True) else "lower"
    line = f"  {results['main_metric']} {results['score']:.4g} ({direction} is better)"
    if base:
        line += f"  baseline {base['score']:.4g} ({base['kind']})"
    mark = {True: "learned", False: "NOT LEARNED: not clearly past the baseline", None: ""}[results.get("learned")]
    if (results.get("details") or {}).get("diverged"):
        mark = "NOT LEARNED: training diverged"
    print(line + (f"  -> {mark}" if mark else ""))
    if (results.get("details") or {}).get("diverged"):
        print("  WARNING: training diverged (the loss stayed far above its start, see metrics.jsonl): this result is "
              "not to be trusted; lower train.lr, set train.max_grad_norm or add warmup", file=sys.stderr)
    print(f"  params trainable {results['params']['trainable']:,} of {results['params']['total']:,}; "
          f"wall {results.get('wall_seconds', 0):.0f} s; {results.get('tokens_per_second', 0):,.0f} tokens/s")
    if report:
        print(f"  report {_write_report(Path(run.dir))}")


def _write_report(run_dir: Path) -> str:
    """The run's HTML report in <run_dir>/report (a report that cannot be made never fails the run)."""
    try:
        from loralab.report.commands import build

        return str(build([run_dir], run_dir / "report", presets=list_presets()))
    except Exception as err:  # noqa: BLE001 - the run is finished and recorded; say why there is no page
        return f"not written ({type(err).__name__}: {err}); make it with: loralab report {run_dir} --out DIR"


# ---------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from loralab.engine import runner

    config, overrides = _split_items(args.items)
    if args.quiet:
        overrides.append("train.quiet=true")
    if args.resume:
        run_dir = Path(args.resume)
        if config or args.preset:
            raise UsageError("--resume uses the run's own config.yaml; drop CONFIG and --preset")
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"--resume {run_dir}: not a run dir (no config.yaml)")
        saved = load_config(run_dir / "config.yaml")
        cfg = load_config(None, overrides, base=saved)
        runner.check_resumable(saved, cfg)
    else:
        cfg = load_config(config, overrides, preset=args.preset)
    if args.dry_run:
        return _dry_run(cfg)
    cache = Path(args.baseline_cache) if args.baseline_cache else None
    if args.run_dir:
        run, results = runner.run_at(cfg, args.run_dir, cache)
    else:
        run, results = runner.run_training(cfg, resume=args.resume, baseline_cache=cache)
    if run is not None:
        _print_summary(run, results, report=not cfg.train.quiet)
    return 0


def _dry_run(cfg: Any) -> int:
    """The resolved config, then the model built with its method: trainable/total counts by kind as one
    JSON object on the last line. Nothing trains."""
    from loralab.core.methods import count_by_kind
    from loralab.engine.experiment import get_experiment

    print(config_to_yaml_with_docs(cfg), end="", flush=True)
    with contextlib.redirect_stdout(sys.stderr):  # what build() prints would break the YAML on stdout
        built = get_experiment(cfg.experiment).build(cfg)
    print(json.dumps({"experiment": cfg.experiment, "method": cfg.lora.method, **count_by_kind(built.model)}))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from loralab.analysis.commands import main as analyze

    return analyze(args.rest)


def cmd_report(args: argparse.Namespace) -> int:
    from loralab.report.commands import main as report

    return report(args.rest, presets=list_presets())


def cmd_score_squad(args: argparse.Namespace) -> int:
    from loralab.metrics.squad import score_files

    print(json.dumps(score_files(args.dataset, args.predictions)))  # bad files: SquadFormatError, exit 2
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from loralab.engine import runner

    _, overrides = _split_items(args.items, allow_config=False)
    cfg = load_config(None, overrides, preset="quickstart")
    print(f"quickstart: {cfg.experiment}/{cfg.task_label} on {cfg.model.name}, runs under {cfg.out_dir}/", flush=True)
    run, results = runner.run_training(cfg)
    if run is not None:
        _print_summary(run, results, report=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate an adapter (of a run dir, or given) with the experiment's report; records a new run."""
    from loralab.engine import runner

    target = Path(args.target)
    _, overrides = _split_items(args.items, allow_config=False)
    adapter = Path(args.adapter) if args.adapter else None
    if target.is_dir() and (target / "config.yaml").is_file():
        config_path = target / "config.yaml"
        adapter = adapter or (None if args.base_only else _find_adapter(target))
    elif target.is_dir() and (target / "adapter_config.json").is_file():
        adapter, config_path = adapter or target, _config_near(target)
    elif target.is_file():
        config_path = target
    else:
        raise UsageError(f"{target}: expected a run dir, an adapter dir or a CONFIG.yaml")
    if config_path is None and not args.preset:
        raise UsageError(f"no config.yaml next to {target}; pass --preset NAME or key=value overrides")
    cfg = load_config(config_path, overrides, preset=args.preset)
    if adapter is None and not args.base_only:
        raise UsageError("no adapter to evaluate: pass --adapter DIR (or --base-only to evaluate the base model)")
    if adapter is None:
        print("evaluating the BASE model: no adapter is loaded", file=sys.stderr)
    run, results = runner.evaluate(cfg, adapter, allow_fresh_head=args.allow_fresh_head)
    _print_summary(run, results)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base weights and save a plain Hugging Face model dir."""
    from loralab.core.adapter_io import check_adapter_files
    from loralab.core.methods import merge_refusal, missing_heads, saved_method
    from loralab.engine.merge import merge_adapter

    adapter = Path(args.adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        adapter = _find_adapter(adapter, "give the adapter dir itself") if adapter.is_dir() else adapter
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{args.adapter_dir}: no adapter_config.json (not an adapter or run dir)")
    method = saved_method(adapter)  # checked before minutes of model loading
    refusal = merge_refusal(method)
    if refusal:
        raise UsageError(f"{adapter} holds a {method!r} run, which cannot be merged: {refusal}")
    if method == "lora":
        check_adapter_files(adapter, heads_required=not args.allow_fresh_head)
    elif not args.allow_fresh_head and (missing := missing_heads(adapter)):
        raise UsageError(f"{adapter}: the head {missing} it lists has no weights in the file, so the "
                         "merged model would carry a random head; pass --allow-fresh-head to merge anyway")
    config, overrides = _split_items(args.items)
    config = config or _config_near(adapter)
    if config is None and not args.preset:
        raise UsageError(f"no config.yaml near {adapter}; pass CONFIG.yaml or --preset so the base model is known")
    info = merge_adapter(load_config(config, overrides, preset=args.preset), adapter, args.out)
    print(f"merged {adapter} into {info['base']}: {args.out} (max |logit diff| {info['max_abs_logit_diff_merged']:.2e} "
          f"merged, {info['max_abs_logit_diff_reloaded']:.2e} reloaded)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from loralab.engine.sweep import resolve_named, run_sweep

    config, items = _split_items(args.items)
    try:
        seeds = [int(s) for s in (args.seeds or "").split(",") if s.strip()] or None
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: expected comma-separated integers (e.g. 0,1,2)") from None
    preset, reference = args.preset, None
    if args.sweep:
        if args.preset or config:
            raise UsageError("--sweep NAME brings its own preset: give --sweep or --preset/CONFIG.yaml, not both")
        preset, items, seeds, reference = resolve_named(args.sweep, items, seeds)
    seeds = seeds or [0]
    summary = run_sweep(args.out, preset, items, seeds, args.jobs, config, reference=reference)
    print(Path(args.out, "sweep.md").read_text(), end="")
    print(f"sweep: {len(summary['points'])} points x {len(seeds)} seeds in {args.out}")
    return 0


def _presets_table() -> str:
    rows = []
    for name, p in sorted(list_presets().items()):
        method = p.get("lora.method", "lora")
        quant = p.get("model.quantize", "none")
        rows.append([name, p["experiment"], p.get("model.name", "-"), method + ("" if quant == "none" else f" ({quant})"),
                     p.get("_doc", "")])
    return format_table(["preset", "experiment", "model", "method", "description"], rows)


def cmd_config(args: argparse.Namespace) -> int:
    if args.schema:
        print(config_help())
        return 0
    if args.presets:
        print(_presets_table())
        return 0
    config, overrides = _split_items(args.items)
    cfg = load_config(config, overrides, preset=args.preset)
    if args.out:
        save_config(cfg, args.out)
    print(config_to_yaml_with_docs(cfg), end="")
    return 0



def _known_error(err: BaseException) -> bool:
    """Errors in what the user gave (config, files, data, models, adapters, a run dir another process
    owns, an unusable registry) and runs that produced no result (NaN): a one-line message, exit 2.
    Anything else (AttributeError, a KeyError, TypeError... inside loralab or an experiment) is a bug."""
    from loralab.engine.experiment import UnknownExperimentError
    from loralab.engine.runs import RegistryError, RunBusyError, RunNotFound

    known: tuple[type, ...] = (ConfigError, UsageError, UnknownExperimentError, OSError, ModuleNotFoundError,
                               UnicodeDecodeError, json.JSONDecodeError, ValueError, RegistryError, RunBusyError,
                               RunNotFound)
    runner = sys.modules.get("loralab.engine.runner")  # imported by the commands that can raise RunFailed
    if runner is not None:
        known += (runner.RunFailed,)
    return isinstance(err, known)


def _one_line(message: str) -> str:
    """A message on one line: its lines joined with "; " (a YAML error's caret art dropped)."""
    lines = [line.strip() for line in message.splitlines()]
    return "; ".join(line for line in lines if line and set(line) - set("^ "))


PASSTHROUGH = {"analyze": cmd_analyze, "report": cmd_report}
"""Commands with parsers of their own: everything after the command word is theirs (--help included)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:], command=argv[0]))
    commands = {n: f for mod in (sys.modules[__name__], cli_results) for n, f in vars(mod).items() if n.startswith("cmd_")}
    parser = build_parser(argparse.Namespace(**commands))
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and hasattr(args, "items") and all("=" in e and not e.startswith("-") for e in extra):
            args.items += extra  # `train CONFIG.yaml --preset X key=v`: overrides after an option
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    try:
        code = args.func(args)
        if "torch.distributed" in sys.modules:  # under torchrun: leave the process group cleanly
            from loralab.engine.distributed import shutdown

            shutdown()
        return code
    except BrokenPipeError:  # `loralab ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("\nloralab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI boundary
        from loralab.engine.runner import Interrupted

        if isinstance(err, Interrupted):
            print("\nloralab: interrupted (checkpoint saved; resume with --resume RUN_DIR)", file=sys.stderr)
            return 130
        if os.environ.get("LORALAB_DEBUG"):
            traceback.print_exc()
        if _known_error(err):
            message = str(err) if not isinstance(err, KeyError) else str(err.args[0])
            print(f"loralab {args.command}: error: {_one_line(message)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"loralab {args.command}: failed: {err.__class__.__name__}: {err}\n"
              "This looks like a bug in loralab: please report it with the traceback above.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
