"""How ΔW relates to W (Hu et al. 2021, §7.3, Table 7), per adapted module, in float64.

For a module with frozen weight W (out × in) and LoRA factors A (r × in), B (out × r)::

    ΔW = scaling · B A,     scaling = alpha / r   (alpha / √r with use_rslora; rank_pattern/alpha_pattern honoured)
    ΔW = U Σ V^⊤            (SVD; k = numerical rank of ΔW, = r unless a factor is rank-deficient)

    delta_norm   = ‖ΔW‖_F
    proj_delta   = ‖U_k^⊤ W V_k‖_F      W projected on ΔW's top-k left/right singular subspaces
    proj_w_top   = ‖P_k^⊤ W Q_k‖_F      the same with W's own top-k singular vectors (W = P Λ Q^⊤)
                                        (= √(λ_1² + … + λ_k²))
    proj_random  = mean over n_random draws of ‖R_1^⊤ W R_2‖_F, R_1 (out × k), R_2 (in × k) random
                   orthonormal (QR of Gaussian matrices, seeded from ``seed`` and the module name)
    w_norm       = ‖W‖_F
    amplification = delta_norm / proj_delta   (``null`` when proj_delta = 0)

The paper uses the adapter's r for the subspaces; k is used instead so that every quantity is determined
by the matrices (past ΔW's rank its singular vectors are arbitrary); ``rank`` (r) and ``rank_delta`` (k)
are both reported and agree for a trained adapter with r ≤ min(out, in). k = min(rank A, rank B, rank ΔW)
with the factors' ranks taken as in :func:`loralab.analysis.subspace.numerical_rank` (tolerant of their
storage dtype's rounding) and ΔW's at the float64 SVD floor. An untrained adapter (B = 0) has k = 0: all
projections are 0 and the amplification is ``null``.

W is read from the base model directory's ``*.safetensors`` by the module's name + ``.weight``, allowing
either side to carry extra leading components (``model.``, ``base_model.``, ``transformer.``): the file key
must equal the name or be a dotted suffix of it, or the other way round. GPT-2's Conv1D stores W as
(in × out); this is detected by shape (against B A's out × in) and W transposed, with the adapter's
``fan_in_fan_out`` deciding a square W. A fused slice ``<module>[slot]`` uses its rows of W.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch

from loralab.analysis.adapters import AnalysisError, Factor, read_config, read_factors
from loralab.analysis.subspace import numerical_rank

__all__ = ["BaseWeights", "delta_w_stats", "run_delta_w", "markdown_table"]


def _suffix(long: str, short: str) -> bool:
    return long == short or long.endswith("." + short)


class BaseWeights:
    """Lazy access to the weights of a model directory's safetensors files (one or several shards)."""

    def __init__(self, base_dir: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(base_dir)
        if not self.dir.is_dir():
            raise AnalysisError(f"--base {self.dir} is not a directory: pass the base model's directory (the one "
                                "holding config.json and model.safetensors)")
        files = sorted(p for p in self.dir.glob("*.safetensors") if p.name != "adapter_model.safetensors")
        if not files:
            raise AnalysisError(f"no *.safetensors weights in {self.dir}; a GGUF or .bin model must first be "
                                "converted (loralab's zoo writes model.safetensors)")
        self._open = safe_open
        self.keys: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    self.keys.update((k, f) for k in h.keys())
            except Exception as e:
                raise AnalysisError(f"{f} could not be read as safetensors ({type(e).__name__}: {e}); the file is "
                                    "corrupt or truncated: re-download the base model") from None

    def key_for(self, module: str) -> str:
        """The file key of ``module``'s weight (see the module docstring for the matching rule)."""
        want = module + ".weight"
        if want in self.keys:
            return want
        cands = [k for k in self.keys if k.endswith(".weight") and (_suffix(want, k) or _suffix(k, want))]
        if not cands:
            raise AnalysisError(f"no weight for module {module} in {self.dir} (looked for {want!r}, allowing a "
                                f"model./base_model. prefix either side); is --base the model the adapter was "
                                f"trained on? keys look like {sorted(self.keys)[:3]}")
        best = max(len(k) if _suffix(want, k) else len(want) for k in cands)
        top = [k for k in cands if (len(k) if _suffix(want, k) else len(want)) == best]
        if len(top) > 1:
            raise AnalysisError(f"module {module} matches several weights in {self.dir}: {top[:4]}; the names "
                                "are ambiguous, pass a base directory whose keys match the adapter's")
        return top[0]

    def get(self, key: str) -> torch.Tensor:
        with self._open(str(self.keys[key]), framework="pt") as h:
            return h.get_tensor(key)


def oriented_weight(w: torch.Tensor, out_f: int, in_f: int, fan_in_fan_out: bool, where: str) -> tuple[torch.Tensor, bool]:
    """W as (out × in) float64 and whether it was transposed (Conv1D's in × out layout)."""
    if not w.dtype.is_floating_point:
        raise AnalysisError(f"{where} is stored as {w.dtype} (quantized?); point --base at the unquantized model")
    if w.dim() != 2:
        raise AnalysisError(f"{where} has shape {tuple(w.shape)}, not a 2-D linear weight")
    if not torch.isfinite(w).all():
        raise AnalysisError(f"{where} has NaN/inf entries; the base model file is damaged")
    shape = tuple(w.shape)
    if shape == (out_f, in_f) and not (out_f == in_f and fan_in_fan_out):
        return w.to(torch.float64), False
    if shape == (in_f, out_f):
        return w.to(torch.float64).T.contiguous(), True
    raise AnalysisError(f"{where} has shape {shape} but the adapter's B A is ({out_f}, {in_f}); is --base the model "
                        "the adapter was trained on?")


def _frob(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, "fro")) if m.numel() else 0.0


def delta_w_stats(f: Factor, w: torch.Tensor, n_random: int = 5, seed: int = 0, name: str = "") -> dict:
    """Table 7's quantities for one module: ``f`` its factors, ``w`` its (out × in) frozen weight."""
    w = w.to(torch.float64)
    dw = f.scaling * (f.B @ f.A)
    if tuple(w.shape) != tuple(dw.shape):
        raise AnalysisError(f"module {name}: W is {tuple(w.shape)} but ΔW is {tuple(dw.shape)}")
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    # rank(ΔW) ≤ min(rank A, rank B) (equal unless range(A) meets ker(B)); each factor's rank uses its
    # storage-rounding tolerance, and ΔW's float64 SVD floor catches the rest
    k = min(numerical_rank(f.A, torch.linalg.svdvals(f.A), f.eps), numerical_rank(f.B, torch.linalg.svdvals(f.B), f.eps),
            numerical_rank(dw, s, 0.0), f.r)
    uw, _, vwh = torch.linalg.svd(w, full_matrices=False)
    delta_norm, proj_delta = _frob(dw), _frob(u[:, :k].T @ w @ vh[:k].T)
    proj_random = None
    if n_random > 0:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        draws = []
        for _ in range(n_random):
            r1 = torch.linalg.qr(torch.randn(w.shape[0], k, generator=gen, dtype=torch.float64))[0]
            r2 = torch.linalg.qr(torch.randn(w.shape[1], k, generator=gen, dtype=torch.float64))[0]
            draws.append(_frob(r1.T @ w @ r2))
        proj_random = sum(draws) / len(draws)
    return {"rank": f.r, "rank_delta": k, "scaling": f.scaling, "delta_sv": s[:f.r].tolist(),
            "delta_norm": delta_norm, "proj_delta": proj_delta,
            "proj_w_top": _frob(uw[:, :k].T @ w @ vwh[:k].T), "proj_random": proj_random,
            "w_norm": _frob(w), "amplification": delta_norm / proj_delta if proj_delta > 0 else None}


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def markdown_table(modules: dict[str, dict]) -> str:
    """Table 7 layout, one row per module."""
    head = ("| module | r | rank ΔW | ‖ΔW‖_F | ‖UᵀWV‖_F (ΔW) | ‖UᵀWV‖_F (W top-r) | ‖UᵀWV‖_F (random) "
            "| ‖W‖_F | amplification |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| `{n}` | {e['rank']} | {e['rank_delta']} | {_fmt(e['delta_norm'])} | {_fmt(e['proj_delta'])} | "
            f"{_fmt(e['proj_w_top'])} | {_fmt(e['proj_random'])} | {_fmt(e['w_norm'])} | {_fmt(e['amplification'])} |"
            for n, e in modules.items()]
    return head + "\n".join(rows) + "\n"


def run_delta_w(adapter_dir: str | Path, base_dir: str | Path, out_dir: str | Path, n_random: int = 5, seed: int = 0,
                *, modules: str | None = None) -> dict:
    """Table 7 for every adapted module (optionally those whose name matches the regex ``modules``).

    Writes ``out_dir/delta_w.json`` = ``{"modules": {name: {"rank", "rank_delta", "scaling", "delta_sv",
    "delta_norm", "proj_delta", "proj_w_top", "proj_random", "w_norm", "amplification", "w_key",
    "transposed"}}, "adapter": .., "base": .., "n_random": .., "seed": .., "skipped": {module: reason}}`` and ``out_dir/delta_w.md``
    (the same as a Markdown table); returns the JSON content.
    """
    if n_random < 0:
        raise AnalysisError(f"n_random must be >= 0, got {n_random}")
    cfg = read_config(adapter_dir)
    if cfg.get("use_dora"):
        raise AnalysisError(f"{adapter_dir} is a DoRA adapter: its update is not scaling·B A, so Table 7 does not apply")
    skipped: dict[str, str] = {}
    factors = read_factors(adapter_dir, skipped)
    if not factors:
        raise AnalysisError(f"{adapter_dir} has no 2-D LoRA module to analyse (skipped: {skipped})")
    if modules is not None:
        try:
            rx = re.compile(modules)
        except re.error as e:
            raise AnalysisError(f"--modules {modules!r} is not a valid regular expression: {e}") from None
        factors = {n: f for n, f in factors.items() if rx.search(n)}
        if not factors:
            raise AnalysisError(f"no module of {adapter_dir} matches --modules {modules!r}")
    base = BaseWeights(base_dir)
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    result: dict = {"modules": {}, "adapter": str(adapter_dir), "base": str(base_dir), "n_random": n_random,
                    "seed": seed, "skipped": skipped}
    for name, f in factors.items():
        module = name.split("[")[0]
        key = base.key_for(module)
        out_total = f.B.shape[0] * (f.n_slices or 1)
        w, transposed = oriented_weight(base.get(key), out_total, f.A.shape[1], fan_in_fan_out,
                                        f"{key} in {base.dir}")
        if f.rows is not None:
            w = w[f.rows[0]:f.rows[1]]
        entry = delta_w_stats(f, w, n_random, seed, name)
        entry.update(w_key=key, transposed=transposed)
        result["modules"][name] = entry
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "delta_w.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    (out / "delta_w.md").write_text(f"ΔW against W (Hu et al. 2021, Table 7) for `{adapter_dir}` on `{base_dir}`"
                                    f" ({n_random} random draws, seed {seed})\n\n" + markdown_table(result["modules"]))
    return result
