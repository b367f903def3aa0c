"""``loralab analyze``: the paper's §7 analyses of trained adapters as commands.

    loralab analyze subspace ADAPTER_A ADAPTER_B [--modules REGEX] [--use A|B] [--seed N] [--no-plots] --out DIR
    loralab analyze delta-w ADAPTER --base MODEL_DIR [--modules REGEX] [--n-random N] [--seed N] --out DIR
    loralab analyze sweep SWEEP_DIR... [--base MODEL_DIR] [--ranks LO,HI] [--seed-rank R] [--modules REGEX] --out DIR
    loralab analyze ranks SWEEP_DIR[=LABEL]... [--key KEY] [--title T] --out DIR

Bad input (a missing directory, no common module, a corrupt file, a base without the weight) prints one
line ``loralab analyze: error: ...`` on stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from loralab.analysis.adapters import AnalysisError

PROG = "loralab analyze"


def build_parser() -> argparse.ArgumentParser:
    """The ``loralab analyze`` argument parser (subcommands ``subspace`` and ``delta-w``)."""
    p = argparse.ArgumentParser(prog=PROG, description="Analyses of trained LoRA adapters (Hu et al. 2021, §7).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{subspace,delta-w,sweep,ranks}")
    s = sub.add_parser("subspace", help="φ(i, j) subspace similarity between two adapters (Eq. 4, Fig. 3/4)",
                       description="φ(i,j) = ||U_a^{i T} U_b^{j}||_F^2 / min(i,j) per module adapted in both.")
    s.add_argument("adapter_a", metavar="ADAPTER_A", help="adapter directory (adapter_config.json + safetensors)")
    s.add_argument("adapter_b", metavar="ADAPTER_B", help="the other adapter directory")
    s.add_argument("--modules", metavar="REGEX", help="only modules whose name matches REGEX (re.search)")
    s.add_argument("--use", choices=("A", "B"), default="A",
                   help="A: right-singular vectors of lora_A (default, the paper's); B: left ones of lora_B")
    s.add_argument("--seed", type=int, default=0, help="seed of the random-Gaussian baseline (default 0)")
    s.add_argument("--no-plots", action="store_true", help="write subspace.json only")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory")
    d = sub.add_parser("delta-w", help="ΔW against W: Table 7's projections and amplification",
                       description="Per module: ||ΔW||_F, ||U^T W V||_F for ΔW's, W's and random top-r "
                                   "subspaces, ||W||_F and the amplification ||ΔW||_F / ||U^T W V||_F.")
    d.add_argument("adapter", metavar="ADAPTER", help="adapter directory")
    d.add_argument("--base", required=True, metavar="MODEL_DIR", help="the base model directory (safetensors)")
    d.add_argument("--modules", metavar="REGEX", help="only modules whose name matches REGEX (re.search)")
    d.add_argument("--n-random", type=int, default=5, help="random orthonormal draws averaged (default 5)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random bases (default 0)")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory")
    w = sub.add_parser("sweep", help="the analyses on a rank sweep's adapters: rank pair, seed pair, ΔW, one report",
                       description="φ between two ranks of one seed (Fig. 3), two seeds of one rank (Fig. 4), ΔW "
                                   "against W at both ranks (Table 7), a summary and one HTML report.")
    w.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="directories written by `loralab sweep --out` "
                   "(several are pooled, e.g. a rank sweep and a second seed at two ranks)")
    w.add_argument("--base", metavar="MODEL_DIR", help="the base model's directory for ΔW (default: the zoo's copy "
                   "of the runs' model)")
    w.add_argument("--no-delta-w", action="store_true", help="skip ΔW (no base weights needed)")
    w.add_argument("--ranks", metavar="LO,HI", help="the rank pair (default 8,64 when trained, else the extremes)")
    w.add_argument("--seed-rank", type=int, metavar="R", help="the rank of the seed pair (default: the high rank)")
    w.add_argument("--modules", metavar="REGEX", help="only modules whose name matches REGEX (re.search)")
    w.add_argument("--key", default="lora.r", help="the grid key holding the rank (default lora.r)")
    w.add_argument("--no-plots", action="store_true", help="JSON and Markdown only (no heatmaps, no report)")
    w.add_argument("--out", required=True, metavar="DIR", help="output directory")
    c = sub.add_parser("ranks", help="score against rank for several sweeps on one plot, with saturation ranks",
                       description="One line per sweep (rank x model size, rank x task difficulty).")
    c.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR[=LABEL]", help="sweep directories, optionally labelled")
    c.add_argument("--key", default="lora.r", help="the grid key holding the rank (default lora.r)")
    c.add_argument("--title", default="", help="the plot's title")
    c.add_argument("--no-plots", action="store_true", help="ranks.json and ranks.md only")
    c.add_argument("--out", required=True, metavar="DIR", help="output directory")
    return p


def _subspace(a: argparse.Namespace) -> None:
    from loralab.analysis.subspace import run_subspace

    res = run_subspace(a.adapter_a, a.adapter_b, a.out, modules=a.modules, use=a.use, seed=a.seed,
                       plots=not a.no_plots)
    print(f"{'module':<48} {'r_a':>4} {'r_b':>4} {'phi(1,1)':>9} {'random':>8}")
    for name, e in res["modules"].items():
        p11 = e["phi"][0][0]
        print(f"{name:<48} {e['r_a']:>4} {e['r_b']:>4} {'-' if p11 is None else f'{p11:.3f}':>9} "
              f"{e['random_phi'][0][0]:>8.3f}")
    print(f"wrote {a.out}/subspace.json" + ("" if a.no_plots else " and the heatmaps"))


def _delta_w(a: argparse.Namespace) -> None:
    from loralab.analysis.delta_w import markdown_table, run_delta_w

    res = run_delta_w(a.adapter, a.base, a.out, n_random=a.n_random, seed=a.seed, modules=a.modules)
    print(markdown_table(res["modules"]), end="")
    print(f"wrote {a.out}/delta_w.json and {a.out}/delta_w.md")


def _ranks_arg(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise AnalysisError(f"--ranks {text!r}: give two integers, e.g. --ranks 8,64") from None
    return lo, hi


def _default_base(sweep_dir: str) -> str:
    from loralab.analysis.sweeps import sweep_adapters
    from loralab.models.zoo import resolve

    model = sweep_adapters(sweep_dir)[0].model
    if not model:
        raise AnalysisError(f"{sweep_dir}: the runs do not name their model; pass --base MODEL_DIR or --no-delta-w")
    try:
        return str(resolve(model))
    except (ValueError, OSError, ModuleNotFoundError) as e:
        raise AnalysisError(f"the runs' base model {model!r} is not available here ({e}); pass --base MODEL_DIR "
                            "or --no-delta-w") from None


def _sweep(a: argparse.Namespace) -> None:
    from loralab.analysis.sweeps import analyze_sweep

    base = None if a.no_delta_w else (a.base or _default_base(a.sweep_dirs[0]))
    summary = analyze_sweep(a.sweep_dirs, a.out, base_dir=base, ranks=_ranks_arg(a.ranks), seed_rank=a.seed_rank,
                            modules=a.modules, key=a.key, plots=not a.no_plots)
    print(open(f"{a.out}/sweep_analysis.md", encoding="utf-8").read(), end="")
    if not a.no_plots:
        from loralab.report.commands import build
        from loralab.report.sources import ReportError

        dirs = [summary["rank_pair"]["dir"]] + [summary[k]["dir"] for k in ("seed_pair",) if k in summary]
        dirs += [d["dir"] for d in summary["delta_w"].values()]
        try:
            index = build([Path(a.out) / d for d in dirs], Path(a.out) / "report",
                          title=f"Adapter analyses · {Path(a.sweep_dirs[0]).name}")
        except ReportError as e:
            raise AnalysisError(f"the analyses are written, the report is not: {e}") from None
        print(f"report: {index}")


def _rank_curves(a: argparse.Namespace) -> None:
    from loralab.analysis.sweeps import rank_curves

    pairs = []
    for item in a.sweeps:
        path, _, label = item.partition("=")
        pairs.append((label or Path(path).name, path))
    rank_curves(pairs, a.out, key=a.key, title=a.title, plots=not a.no_plots)
    print(open(f"{a.out}/ranks.md", encoding="utf-8").read(), end="")
    print(f"wrote {a.out}/ranks.json" + ("" if a.no_plots else f" and {a.out}/ranks.png"))


COMMANDS = {"subspace": _subspace, "delta-w": _delta_w, "sweep": _sweep, "ranks": _rank_curves}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``loralab analyze`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse has printed usage + error (2) or help (0)
        return int(e.code or 0)
    try:
        COMMANDS[args.command](args)
    except (AnalysisError, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
