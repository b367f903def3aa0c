"""``loralab`` command line: train, eval, merge, runs, models, score-e2e, quickstart, config.

Exit codes: 0 ok; 2 usage or configuration error (one message on stderr, no traceback);
1 runtime failure (traceback on stderr); 130 interrupted (Ctrl-C).
Experiments and the trainer are imported only when a command needs them, so ``--help``,
``config`` and ``runs`` stay fast and work without transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from loralab.engine.config import (ConfigError, RunConfig, config_help, config_to_dict, config_to_yaml_with_docs,
                                   list_presets, load_config, save_config)
from loralab.engine.runs import (compare_runs, create_run, format_table, get_run, headline, list_runs, open_run)

RESUME_SAFE_KEYS = ("train.epochs", "train.max_steps", "train.quiet", "train.log_every", "train.tensorboard",
                    "train.num_workers", "train.save_every")
"""Keys an override may change when resuming: they extend or observe the run but do not alter its math."""


class UsageError(Exception):
    """Bad command-line use; exit code 2."""


class Interrupted(Exception):
    """The trainer stopped on Ctrl-C and returned (after saving a checkpoint); exit code 130."""


# ---------------------------------------------------------------- orchestration


def get_experiment(name: str) -> Any:
    """The experiment module (``build(cfg)``, ``report(...)``) from loralab.tasks, imported lazily."""
    tasks = importlib.import_module("loralab.tasks")
    if hasattr(tasks, "get_experiment"):
        return tasks.get_experiment(name)
    return importlib.import_module(f"loralab.tasks.{name}")


def _get_fit() -> Callable:
    from loralab.engine.trainer import fit  # lazily: the trainer pulls in torch

    return fit


def _fit_kwargs(fit: Callable, run_dir: Path, resume: bool) -> dict[str, Any]:
    params = inspect.signature(fit).parameters
    kwargs: dict[str, Any] = {"run_dir": run_dir}
    if resume:
        if "resume" not in params:
            raise RuntimeError("this trainer's fit() takes no `resume` argument; cannot resume")
        kwargs["resume"] = True
    return kwargs


def _was_interrupted(fit_result: Any) -> bool:
    """The trainer returns (status "interrupted") after checkpointing on the first Ctrl-C."""
    status = fit_result.get("status") if isinstance(fit_result, dict) else getattr(fit_result, "status", None)
    return status == "interrupted"


def _main_process_run(cfg: RunConfig, resume: str | Path | None) -> tuple[Any, Path]:
    """Rank 0 creates (or reopens) the run; under torchrun the other ranks get its dir by broadcast."""
    from loralab.engine import distributed as ddp  # lazily: torch

    ddp.init()
    run = None
    if ddp.is_main():
        if resume is not None:
            run = open_run(resume)
            save_config(cfg, run.dir / "config.yaml")
            run.mark_running()
        else:
            run = create_run(cfg)
        if not cfg.train.quiet:
            print(f"run {run.id[:8]}: {run.dir}", file=sys.stderr, flush=True)
    if not ddp.active():
        return run, run.dir
    import torch.distributed as dist

    shared = [str(run.dir) if run is not None else None]
    dist.broadcast_object_list(shared, src=0)
    return run, Path(shared[0])


def run_training(cfg: RunConfig, resume: str | Path | None = None) -> tuple[Any, dict]:
    """Create (or reopen) the run, build the experiment, fit, report, and record the outcome.

    Returns ``(run, results)`` (``run`` is None on ranks other than 0, which neither report nor
    record). On failure the run is marked failed (traceback in error.txt) and the exception
    propagates; on Ctrl-C it is marked interrupted (resume it with ``--resume RUN_DIR``).
    """
    experiment = get_experiment(cfg.experiment)  # import problems surface before a run dir exists
    fit = _get_fit()
    run, run_dir = _main_process_run(cfg, resume)
    try:
        model, task, tokenizer = experiment.build(cfg)
        fit_result = fit(model, task, cfg.train, **_fit_kwargs(fit, run_dir, resume is not None))
        if _was_interrupted(fit_result):
            raise Interrupted()
        results = experiment.report(cfg, model, tokenizer, run_dir, fit_result) if run is not None else {}
    except (KeyboardInterrupt, Interrupted):
        if run is not None:
            run.fail(f"interrupted (Ctrl-C); resume with: loralab train --resume {run.dir}", status="interrupted")
        raise
    except BaseException:
        if run is not None:
            run.fail(traceback.format_exc())
        raise
    if run is not None:
        run.finish(results if isinstance(results, dict) else {"results": results})
    return run, results


def _find_adapter(run_dir: Path) -> Path:
    """The adapter of a run dir: the dir itself, best/, final/, adapter/, else the only one inside."""
    for candidate in (run_dir, run_dir / "best", run_dir / "final", run_dir / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    found = sorted(p.parent for p in run_dir.rglob("adapter_config.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"no adapter (adapter_config.json) under {run_dir}; pass --adapter DIR")
    raise UsageError(f"several adapters under {run_dir} ({', '.join(map(str, found[:4]))}); pass --adapter DIR")


def _config_near(adapter_dir: Path) -> Path | None:
    for d in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


# ---------------------------------------------------------------- argument handling


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


def _print_summary(run: Any, results: dict) -> None:
    flat = {k: v for k, v in headline(results).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"run {run.id[:8]} completed: {run.dir}")
    if flat:
        print(format_table(["metric", "value"], [[k, v] for k, v in list(flat.items())[:20]]))


def cmd_train(args: argparse.Namespace) -> int:
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
        changed = sorted(k for k, v in headline(config_to_dict(cfg)).items()
                         if headline(config_to_dict(saved)).get(k) != v)
        unsafe = [k for k in changed if k not in RESUME_SAFE_KEYS]
        if unsafe:
            raise UsageError(f"cannot change {', '.join(unsafe)} when resuming (it would not be the same run); "
                             f"allowed: {', '.join(RESUME_SAFE_KEYS)}")
    else:
        cfg = load_config(config, overrides, preset=args.preset)
    if args.dry_run:
        print(config_to_yaml_with_docs(cfg), end="")
        return 0
    run, results = run_training(cfg, resume=args.resume)
    if run is not None:
        _print_summary(run, results)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    _, overrides = _split_items(args.items, allow_config=False)
    cfg = load_config(None, overrides, preset="quickstart")
    print(f"quickstart: {cfg.experiment}/{cfg.data.task} on {cfg.model.name}, runs under {cfg.out_dir}/", flush=True)
    run, results = run_training(cfg)
    if run is not None and isinstance(results, dict) and results.get("summary"):
        print(f"run {run.id[:8]} completed: {run.dir}")  # the experiment printed its own summary block
    elif run is not None:
        _print_summary(run, results)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate an adapter (of a run dir, or given) with the experiment's report; records a new run."""
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
    cfg = dataclasses.replace(cfg, name=f"eval-{cfg.run_name}",
                              lora=dataclasses.replace(cfg.lora, init_from=str(adapter) if adapter else None))
    if adapter is None:
        print("evaluating the BASE model: no adapter is loaded", file=sys.stderr)
    experiment = get_experiment(cfg.experiment)
    run = create_run(cfg)
    try:
        model, _task, tokenizer = experiment.build(cfg)
        results = experiment.report(cfg, model, tokenizer, run.dir, None)
    except BaseException:
        run.fail(traceback.format_exc())
        raise
    run.finish(results)
    _print_summary(run, results)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base weights and save a plain Hugging Face model dir."""
    import torch

    from loralab.core.inject import lora_modules, unload

    adapter = Path(args.adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        adapter = _find_adapter(adapter) if adapter.is_dir() else adapter
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{args.adapter_dir}: no adapter_config.json (not an adapter or run dir)")
    config, overrides = _split_items(args.items)
    config = config or _config_near(adapter)
    if config is None and not args.preset:
        raise UsageError(f"no config.yaml near {adapter}; pass CONFIG.yaml or --preset so the base model is known")
    cfg = load_config(config, overrides, preset=args.preset)
    if cfg.model.quantize != "none":  # merging into 4-bit weights would re-quantize the sum
        print(f"note: merging into the full-precision base, not the {cfg.model.quantize} one it trained on",
              file=sys.stderr)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize="none"),
                              lora=dataclasses.replace(cfg.lora, init_from=str(adapter)))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty; choose a new directory")
    model, task, tokenizer = get_experiment(cfg.experiment).build(cfg)
    if not lora_modules(model):
        raise RuntimeError(f"no LoRA layers in the model built with {adapter}: nothing to merge")
    model.eval()
    batch = {k: v for k, v in task.collate([task.train_dataset[0]]).items() if k in ("input_ids", "attention_mask")}

    def check(logits: torch.Tensor, what: str) -> float:
        diff = (before - logits.float()).abs().max().item()
        tolerance = 1e-3 * max(1.0, before.abs().max().item())
        if not diff <= tolerance:
            raise RuntimeError(f"{what} differs from the adapter model by {diff:.3g} (> {tolerance:.3g})")
        return diff

    with torch.no_grad():
        before = model(**batch).logits.float()
        model = unload(model, merge=True)  # merge=True also keeps the trained modules_to_save (the head)
        merged_diff = check(model(**batch).logits, "the merged model (not saved)")
        model.save_pretrained(out)
        reloaded = type(model).from_pretrained(out).eval()  # what a user of the exported dir will get
        reload_diff = check(reloaded(**batch).logits, f"the model saved in {out}, reloaded,")
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    (out / "merge_info.json").write_text(json.dumps(
        {"adapter": str(adapter), "base": cfg.model.name, "max_abs_logit_diff_merged": merged_diff,
         "max_abs_logit_diff_reloaded": reload_diff}, indent=2) + "\n")
    print(f"merged {adapter} into {cfg.model.name}: {out} (max |logit diff| {merged_diff:.2e} merged, "
          f"{reload_diff:.2e} reloaded)")
    return 0


def _brief(metrics: dict[str, Any], n: int = 3) -> str:
    """A few numeric headline metrics, "score" first when a task reports one."""
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = sorted(numeric, key=lambda k: (k != "score", not k.startswith(("metrics.", "eval")), ))[:n]
    return " ".join(f"{k}={numeric[k]:.4g}" for k in keys)


def cmd_runs(args: argparse.Namespace) -> int:
    root = Path(args.root)
    try:
        if args.runs_command == "list":
            rows = [[r.id[:8], r.created, r.status, r.name, r.experiment, r.model, r.task, _brief(r.metrics)]
                    for r in list_runs(root)]
            print(format_table(["id", "created", "status", "name", "experiment", "model", "task", "metrics"], rows)
                  if rows else f"no runs in {root}")
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
    from loralab.models import zoo

    models = zoo.list_models()
    rows = [dataclasses.asdict(m) if dataclasses.is_dataclass(m) else m for m in models]
    if rows and all(isinstance(m, dict) for m in rows):
        keys = list(dict.fromkeys(k for m in rows for k in m))
        print(format_table(keys, [[m.get(k) for k in keys] for m in rows]))
    else:
        print("\n".join(str(m) for m in rows))
    return 0


def cmd_glue_table(args: argparse.Namespace) -> int:
    from loralab.tasks import glue_report

    if not Path(args.runs_dir).is_dir():
        raise UsageError(f"{args.runs_dir}: no such directory")
    results = glue_report.collect_results(args.runs_dir)
    if not results:
        raise UsageError(f"no finished GLUE runs under {args.runs_dir}")
    glue_report.write_glue_table(results, args.out or args.runs_dir)
    return 0


def cmd_score_e2e(args: argparse.Namespace) -> int:
    from loralab.metrics.e2e import score_files

    for path in (args.hyp, args.ref):
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such file")
    try:
        scores = score_files(args.hyp, args.ref)
    except ValueError as e:  # count mismatches, empty groups: the files are wrong, not loralab
        raise UsageError(str(e)) from e
    # one JSON object (raw values, BLEU as a fraction), as the official scorer's consumers expect
    print(format_table(["metric", "value"], list(scores.items())) if args.table else json.dumps(scores))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.schema:
        print(config_help(RunConfig))
        return 0
    if args.presets:
        for name, overrides in sorted(list_presets().items()):
            print(f"{name}: {json.dumps(overrides)}")
        return 0
    config, overrides = _split_items(args.items)
    cfg = load_config(config, overrides, preset=args.preset)
    if args.out:
        save_config(cfg, args.out)
    print(config_to_yaml_with_docs(cfg), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab", description="LoRA and QLoRA fine-tuning you can trust.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    schema = "configuration keys (YAML sections or dotted key=value overrides):\n\n" + config_help(RunConfig)

    p = sub.add_parser("train", help="train a run", formatter_class=raw, epilog=schema,
                       description="loralab train [CONFIG.yaml] [--preset NAME] [key=value ...]\n"
                                   "Layers: defaults -> preset -> CONFIG.yaml -> key=value overrides.")
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    p.add_argument("--preset", help="named set of overrides (see `loralab config --presets`)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output (same as train.quiet=true)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate an adapter (run dir or adapter dir)", formatter_class=raw,
                       epilog=schema)
    p.add_argument("target", metavar="RUN_DIR|ADAPTER_DIR|CONFIG.yaml")
    p.add_argument("items", nargs="*", metavar="key=value")
    p.add_argument("--adapter", metavar="DIR", help="adapter dir (default: the run's best/final adapter)")
    p.add_argument("--preset")
    p.add_argument("--base-only", action="store_true", help="evaluate the base model without any adapter")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge an adapter into its base and save a Hugging Face model dir")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--preset")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("runs", help="list, show or compare runs")
    p.add_argument("--root", default="runs", help="run root holding runs.sqlite (default: runs)")
    runs_sub = p.add_subparsers(dest="runs_command", required=True, metavar="list|show|compare")
    runs_sub.add_parser("list", help="all runs")
    runs_sub.add_parser("show", help="one run").add_argument("id", help="run id or prefix")
    runs_sub.add_parser("compare", help="runs side by side").add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_runs)

    sub.add_parser("models", help="list the offline model zoo").set_defaults(func=cmd_models)

    p = sub.add_parser("glue-table", help="the GLUE table of finished runs beside the paper's numbers")
    p.add_argument("runs_dir", metavar="RUNS_DIR")
    p.add_argument("--out", help="where glue_table.md/.json go (default: RUNS_DIR)")
    p.set_defaults(func=cmd_glue_table)

    p = sub.add_parser("score-e2e", help="score E2E NLG outputs against references (BLEU, NIST, METEOR, ...)")
    p.add_argument("hyp", metavar="HYP")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default)")
    p.add_argument("--table", action="store_true", help="print a table instead of JSON")
    p.set_defaults(func=cmd_score_e2e)

    p = sub.add_parser("quickstart", help="a small end-to-end run (preset 'quickstart')")
    p.add_argument("items", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("config", help="print the resolved config (or the documented schema)",
                       formatter_class=raw, epilog=schema)
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    p.add_argument("--preset")
    p.add_argument("--schema", action="store_true", help="every key with its type, default and doc")
    p.add_argument("--presets", action="store_true", help="list the registered presets")
    p.add_argument("--out", metavar="FILE", help="also save the resolved config to FILE")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    try:
        code = args.func(args)
        if "torch.distributed" in sys.modules:  # under torchrun: leave the process group cleanly
            from loralab.engine.distributed import shutdown

            shutdown()
        return code
    except (ConfigError, UsageError) as err:
        print(f"loralab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `loralab ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except (KeyboardInterrupt, Interrupted):
        print("\nloralab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI boundary: report, then a nonzero exit
        traceback.print_exc()
        print(f"loralab {args.command}: failed: {err.__class__.__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
