"""Normalized subspace similarity between two LoRA adapters (Hu et al. 2021, §7.2, Eq. 4).

For one module adapted in both adapters, take the SVD of each ``lora_A`` (r × in), ``A = P Σ Q^⊤``, and let
U^{i} be its top-i right-singular vectors (the first i columns of Q: the input-space directions the
adapter reads). Then, for 1 ≤ i ≤ r_1 and 1 ≤ j ≤ r_2::

    φ(A_1, A_2, i, j) = ‖U_1^{i⊤} U_2^{j}‖²_F / min(i, j)  ∈ [0, 1]

1 means the smaller of the two subspaces lies inside the larger, 0 that they are orthogonal. ``use="B"``
does the same with the left-singular vectors of ``lora_B`` (out × r), the output-space directions (the
paper's footnote). Everything is float64. With M = U_1^⊤ U_2 (r_1 × r_2), ‖U_1^{i⊤} U_2^{j}‖²_F is the sum of
M² over the leading i × j block, so the whole grid is one double cumulative sum.

Rank-deficient factors: if a factor's numerical rank k is below its r, its top-i subspace for i > k is
not determined by the factor (the SVD fills it with arbitrary null-space directions), so those rows
(or columns) of φ are written as ``null`` and the numerical ranks are reported (``rank_a``, ``rank_b``).
This includes r > in (e.g. r = 1024 on a 576-wide model): only ``in`` directions exist. A singular value
counts when it exceeds max(ε_s/2 · ‖M‖_F, σ_max · max(shape) · ε_64), ε_s the machine epsilon of the dtype
the factor was stored in: rounding each entry to that dtype moves every singular value by at most
‖E‖_2 ≤ ‖E‖_F ≤ ε_s/2 · ‖M‖_F, so smaller ones cannot be told from zero; the second term is the float64
SVD's own floor.

Baseline: φ between two random-Gaussian matrices of the same shapes as the two factors, seeded from
``seed`` and the module name (so a module's baseline does not depend on which other modules are kept).
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch

from loralab.analysis.adapters import AnalysisError, Factor, read_factors

__all__ = ["phi_grid", "basis", "numerical_rank", "subspace_similarity", "run_subspace", "safe_filename"]


F64_EPS = float(torch.finfo(torch.float64).eps)


def numerical_rank(m: torch.Tensor, s: torch.Tensor, eps: float) -> int:
    """Number of singular values ``s`` of ``m`` above max(eps/2 · ‖m‖_F, s_max · max(m.shape) · ε_64)
    (``eps``: the storage dtype's machine epsilon; 0 for an all-zero matrix)."""
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    tol = max(eps / 2 * float(torch.linalg.matrix_norm(m, "fro")), float(s.max()) * max(m.shape) * F64_EPS)
    return int((s > tol).sum())


def basis(factor: Factor, use: str = "A") -> tuple[torch.Tensor, int]:
    """Orthonormal basis (columns, by decreasing singular value) and numerical rank of one factor.

    ``use="A"``: right-singular vectors of lora_A (in × min(r, in)). ``use="B"``: left-singular vectors of
    lora_B (out × min(r, out)).
    """
    m = factor.A.T if use == "A" else factor.B  # the singular vectors wanted are m's left ones
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return u, numerical_rank(m, s, factor.eps)


def phi_grid(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖u1[:, :i]^⊤ u2[:, :j]‖²_F / min(i, j) for all 1 ≤ i ≤ u1.shape[1], 1 ≤ j ≤ u2.shape[1].

    ``u1`` and ``u2`` must have orthonormal columns in the same space; computed in float64.
    """
    if u1.shape[0] != u2.shape[0]:
        raise AnalysisError(f"the two bases live in spaces of different dimension ({u1.shape[0]} vs "
                            f"{u2.shape[0]}): the adapters were not trained on the same base model")
    m2 = (u1.double().T @ u2.double()) ** 2
    overlap = m2.cumsum(0).cumsum(1)
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    return overlap / torch.minimum(i, j)


def _masked(phi: torch.Tensor, r_a: int, r_b: int, rank_a: int, rank_b: int) -> list[list[float | None]]:
    """φ as r_a lists of r_b values, None where i > rank_a or j > rank_b (undetermined or nonexistent)."""
    return [[float(phi[i, j]) if (i < rank_a and j < rank_b) else None for j in range(r_b)] for i in range(r_a)]


def _random_phi(name: str, shape_a: tuple[int, int], shape_b: tuple[int, int], use: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    ga = torch.randn(shape_a, generator=gen, dtype=torch.float64)
    gb = torch.randn(shape_b, generator=gen, dtype=torch.float64)
    if use == "A":  # right-singular vectors of (r × in) matrices
        ga, gb = ga.T, gb.T
    ua = torch.linalg.svd(ga, full_matrices=False)[0]
    ub = torch.linalg.svd(gb, full_matrices=False)[0]
    return phi_grid(ua, ub)


def subspace_similarity(fa: Factor, fb: Factor, use: str = "A", seed: int = 0, name: str = "") -> dict:
    """One module's entry of ``subspace.json``: r_a, r_b, numerical ranks, φ and the random baseline."""
    ua, rank_a = basis(fa, use)
    ub, rank_b = basis(fb, use)
    shape_a, shape_b = (tuple(fa.A.shape), tuple(fb.A.shape)) if use == "A" else (tuple(fa.B.shape), tuple(fb.B.shape))
    if (shape_a[1] if use == "A" else shape_a[0]) != (shape_b[1] if use == "A" else shape_b[0]):
        side = "in_features (lora_A columns)" if use == "A" else "out_features (lora_B rows)"
        raise AnalysisError(f"module {name}: the adapters disagree on {side}: lora_{use} shapes {shape_a} and "
                            f"{shape_b}; were they trained on the same base model?")
    phi = phi_grid(ua, ub)
    rand = _random_phi(name, shape_a, shape_b, use, seed)  # Gaussian: full rank min(r, dim) almost surely
    ra, rb = fa.A.shape[0], fb.A.shape[0]
    return {"r_a": fa.r, "r_b": fb.r, "rank_a": rank_a, "rank_b": rank_b,
            "phi": _masked(phi, ra, rb, rank_a, rank_b),
            "random_phi": _masked(rand, ra, rb, rand.shape[0], rand.shape[1])}


def _common(a: dict[str, Factor], b: dict[str, Factor], modules: str | None, dirs: tuple[str, str]) -> list[str]:
    names = [n for n in a if n in b]
    if modules is not None:
        try:
            rx = re.compile(modules)
        except re.error as e:
            raise AnalysisError(f"--modules {modules!r} is not a valid regular expression: {e}") from None
        names = [n for n in names if rx.search(n)]
    if not names:
        only_a, only_b = sorted(a.keys() - b.keys())[:3], sorted(b.keys() - a.keys())[:3]
        filt = f" matching --modules {modules!r}" if modules is not None else ""
        raise AnalysisError(f"no module is adapted in both {dirs[0]} and {dirs[1]}{filt} "
                            f"(e.g. only in the first: {only_a}, only in the second: {only_b})")
    return names


def safe_filename(name: str) -> str:
    """A module name as a file-name stem: anything outside [A-Za-z0-9._-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def run_subspace(adapter_a: str | Path, adapter_b: str | Path, out_dir: str | Path, modules: str | None = None,
                 use: str = "A", seed: int = 0, *, plots: bool = True) -> dict:
    """φ for every module adapted in both adapters (optionally those whose name matches ``modules``, a
    regex searched in the module name); writes ``out_dir/subspace.json`` and, with ``plots``, a heatmap
    ``phi_<module>.png`` per module and ``per_layer.png`` when module names carry layer indices.

    Returns the JSON content: ``{"modules": {name: {"r_a", "r_b", "rank_a", "rank_b", "phi",
    "random_phi"}}, "use": use, "adapters": [adapter_a, adapter_b], "seed": seed, "skipped": {}}`` where
    ``phi`` has r_a rows of r_b values (``phi[i-1][j-1]`` = φ(i, j); ``null`` past a factor's numerical
    rank), ``random_phi`` is the same grid for Gaussian factors of the same shapes, and ``skipped`` holds
    {module: reason} for adapted modules not analysed (embeddings, convolutions).
    """
    if use not in ("A", "B"):
        raise AnalysisError(f"use must be 'A' (lora_A right-singular vectors) or 'B' (lora_B left ones), got {use!r}")
    skipped: dict[str, str] = {}
    a, b = read_factors(adapter_a, skipped), read_factors(adapter_b, skipped)
    names = _common(a, b, modules, (str(adapter_a), str(adapter_b)))
    result = {"modules": {n: subspace_similarity(a[n], b[n], use, seed, n) for n in names},
              "use": use, "adapters": [str(adapter_a), str(adapter_b)], "seed": seed, "skipped": skipped}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "subspace.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    if plots:
        from loralab.analysis import plots as P

        for n, entry in result["modules"].items():
            P.phi_heatmap(entry["phi"], out / f"phi_{safe_filename(n)}.png", title=n, use=use,
                          labels=(Path(adapter_a).name, Path(adapter_b).name))
        P.per_layer_summary(result["modules"], out / "per_layer.png")
    return result
