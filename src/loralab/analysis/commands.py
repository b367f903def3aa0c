"""``loralab analyze``: the paper's §7 analyses of trained adapters as commands.

    loralab analyze subspace ADAPTER_A ADAPTER_B [--modules REGEX] [--use A|B] [--seed N] [--no-plots] --out DIR
    loralab analyze delta-w ADAPTER --base MODEL_DIR [--modules REGEX] [--n-random N] [--seed N] --out DIR

Bad input (a missing directory, no common module, a corrupt file, a base without the weight) prints one
line ``loralab analyze: error: ...`` on stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loralab.analysis.adapters import AnalysisError

PROG = "loralab analyze"


def build_parser() -> argparse.ArgumentParser:
    """The ``loralab analyze`` argument parser (subcommands ``subspace`` and ``delta-w``)."""
    p = argparse.ArgumentParser(prog=PROG, description="Analyses of trained LoRA adapters (Hu et al. 2021, §7).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{subspace,delta-w}")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``loralab analyze`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse has printed usage + error (2) or help (0)
        return int(e.code or 0)
    try:
        (_subspace if args.command == "subspace" else _delta_w)(args)
    except (AnalysisError, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
