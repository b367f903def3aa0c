"""Reading the LoRA factors of a PEFT-format adapter directory for analysis (float64, no model needed).

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r × in) and ``base_model.model.<module>.lora_B.weight``
(out × r). The module's name is ``<module>``; its rank and alpha are ``r``/``lora_alpha`` unless a
``rank_pattern``/``alpha_pattern`` key matches it (loralab's and PEFT's rule: the key is a whole dotted
suffix of the name, or a regex matching the name in full or a dotted suffix of it; the first matching key
wins), and its scaling is alpha / r, or alpha / √r with ``use_rslora``.

loralab's fused per-slice adapters (config ``loralab_fused_qkv``: {name suffix: enable}, e.g. GPT-2's
``c_attn`` with [True, False, True]) store lora_A as (r·k) × in = [A_1; …; A_k] and lora_B as
(d·k) × r = [B_1; …; B_k] for the k enabled slices of out = n·d rows. Each enabled slice is its own LoRA
update ΔW_slot = scaling · B_i A_i on output rows slot·d … (slot+1)·d, and is analysed as the module
``<module>[slot]`` (``Factor.rows`` gives its rows of the base weight).

Embedding (``lora_embedding_A/B``) and convolution (4-D) factors are not analysed; :func:`read_factors`
reports them, with the reason, in its ``skipped`` argument.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_NAME, WEIGHTS_NAME, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
FUSED_KEY = "loralab_fused_qkv"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AnalysisError(ValueError):
    """A problem with the inputs of an analysis, worded for the user (file and fix)."""


@dataclass
class Factor:
    """One (slice of a) LoRA module: ΔW = scaling · B A, in float64."""

    A: torch.Tensor  # r × in
    B: torch.Tensor  # out × r (out = the slice's rows for a fused slice)
    r: int
    alpha: float
    scaling: float
    eps: float  # machine epsilon of the dtype the factors were stored in (rank tolerance)
    rows: tuple[int, int] | None = None  # the slice's rows of the (out × in) base weight, fused only
    n_slices: int | None = None  # fused only: how many equal slices the base output has


def pattern_value(name: str, pattern: dict, default):
    """``pattern[key]`` for the first key matching module ``name`` (see the module docstring), else default."""
    for key, value in (pattern or {}).items():
        if name == key or name.endswith("." + key):
            return value
        try:
            if re.fullmatch(key, name) or re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
                return value
        except re.error:
            continue
    return default


def read_config(adapter_dir: str | Path) -> dict:
    """The adapter's ``adapter_config.json`` as a dict (refusing a missing/corrupt file or a non-LoRA type)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AnalysisError(f"{d} is not a directory: pass an adapter directory holding {CONFIG_NAME} and "
                            f"{WEIGHTS_NAME}")
    path = d / CONFIG_NAME
    if not path.exists():
        raise AnalysisError(f"no {CONFIG_NAME} in {d}: is this an adapter directory (written by save_adapter "
                            "or PEFT's save_pretrained)?")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnalysisError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise AnalysisError(f"{path} holds a JSON {type(cfg).__name__}, not an object; re-save the adapter")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AnalysisError(f"{path}: peft_type={cfg['peft_type']!r}; only LORA adapters can be analysed")
    return cfg


def load_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's safetensors file (never a pickle), refusing a missing or unreadable one."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.exists():
        hint = " (found adapter_model.bin: convert it to safetensors; pickles are never loaded)" \
            if (Path(adapter_dir) / "adapter_model.bin").exists() else ""
        raise AnalysisError(f"no {WEIGHTS_NAME} in {adapter_dir}{hint}")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for corrupt headers/truncation
        raise AnalysisError(f"{path} could not be read as safetensors ({type(e).__name__}: {e}); the file is "
                            "corrupt or truncated: re-save or re-download the adapter") from None


def _fused_enable(name: str, fused: dict) -> list[bool] | None:
    for key, enable in (fused or {}).items():
        if name == key or name.endswith("." + key):
            return list(enable)
    return None


def read_factors(adapter_dir: str | Path, skipped: dict[str, str] | None = None) -> dict[str, Factor]:
    """All 2-D LoRA modules of an adapter directory, by module name (fused slices as ``<module>[slot]``).

    Factors are converted to float64. Modules that cannot be analysed (4-D conv factors, embeddings) are
    recorded in ``skipped`` ({name: reason}) when given. Raises :class:`AnalysisError` on a missing or
    corrupt file, a lora_A without its lora_B, or a rank disagreeing with the config.
    """
    cfg = read_config(adapter_dir)
    tensors = load_tensors(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if ".lora_embedding_" in key and skipped is not None:
            skipped[key.removeprefix(PREFIX).split(".lora_embedding_")[0]] = "embedding adapter (not analysed)"
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
    use_rslora = bool(cfg.get("use_rslora", False))
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    out: dict[str, Factor] = {}
    for name, ab in sorted(pairs.items()):
        where = f"{Path(adapter_dir) / WEIGHTS_NAME}: module {name}"
        if set(ab) != {"A", "B"}:
            have = "lora_A" if "A" in ab else "lora_B"
            raise AnalysisError(f"{where} has {have} but not its partner; the adapter file is incomplete")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2:
            if skipped is not None:
                skipped[name] = f"{A.dim()}-D factors (convolution adapter, not analysed)"
            continue
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AnalysisError(f"{where} has NaN/inf entries (a diverged training?); nothing can be computed from it")
        eps = float(torch.finfo(A.dtype).eps) if A.dtype.is_floating_point else float(torch.finfo(torch.float32).eps)
        r = int(pattern_value(name, cfg.get("rank_pattern") or {}, r0))
        alpha = float(pattern_value(name, cfg.get("alpha_pattern") or {}, alpha0))
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        A64, B64 = A.to(torch.float64), B.to(torch.float64)
        enable = _fused_enable(name, cfg.get(FUSED_KEY) or {})
        if enable is None:
            if A.shape[0] != r or B.shape[1] != r:
                raise AnalysisError(f"{where}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not have the "
                                    f"rank r={r} that adapter_config.json gives it (r / rank_pattern)")
            out[name] = Factor(A64, B64, r, alpha, scaling, eps)
            continue
        k = sum(enable)
        if A.shape[0] != r * k or B.shape[1] != r or B.shape[0] % k:
            raise AnalysisError(f"{where}: fused adapter with {k} enabled slices of rank {r} needs lora_A "
                                f"({r * k}, in) and lora_B (d*{k}, {r}); found {tuple(A.shape)} and {tuple(B.shape)}")
        d = B.shape[0] // k
        slots = [j for j, on in enumerate(enable) if on]
        for i, slot in enumerate(slots):
            out[f"{name}[{slot}]"] = Factor(A64[i * r:(i + 1) * r], B64[i * d:(i + 1) * d], r, alpha, scaling, eps,
                                            rows=(slot * d, (slot + 1) * d), n_slices=len(enable))
    if not out and not skipped:
        raise AnalysisError(f"{Path(adapter_dir) / WEIGHTS_NAME} holds no lora_A/lora_B weights; is it a LoRA "
                            "adapter?")
    return out
