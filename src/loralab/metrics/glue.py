"""GLUE metrics (no torch: inputs are plain sequences or numpy arrays).

The paper (Hu et al. 2021, Table 2) reports accuracy for every task except CoLA (Matthews
correlation) and STS-B (Pearson correlation); MRPC and QQP additionally get F1 of the positive
class, MNLI is scored on its matched and mismatched dev sets separately.

    accuracy  = mean(pred == label)
    MCC       = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))      (0 when a factor is 0)
    F1        = 2 TP / (2 TP + FP + FN)                                    (positive class = 1)
    Pearson   = cov(x, y) / (std(x) std(y))
    Spearman  = Pearson of the ranks (ties get their average rank)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Metric that selects checkpoints / fills the paper's table, per task (lower-case task keys).
MAIN_METRIC: dict[str, str] = {
    "cola": "matthews_corr",
    "sst2": "accuracy",
    "mrpc": "accuracy",
    "qqp": "accuracy",
    "mnli": "accuracy",  # reported per dev set as mnli_m / mnli_mm by the task module
    "qnli": "accuracy",
    "rte": "accuracy",
    "stsb": "pearson",
}


def _as_1d(values: Sequence | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    preds, gold = _as_1d(predictions, "predictions"), _as_1d(labels, "labels")
    if preds.shape != gold.shape:
        raise ValueError(f"predictions and labels differ in length: {len(preds)} vs {len(gold)}")
    if len(preds) == 0:
        raise ValueError("cannot score an empty set of predictions")
    return preds, gold


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    preds, gold = _check_pair(predictions, labels)
    return float(np.mean(preds == gold))


def matthews_corr(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class generalisation via scikit-learn; binary for CoLA)."""
    from sklearn.metrics import matthews_corrcoef

    preds, gold = _check_pair(predictions, labels)
    return float(matthews_corrcoef(gold, preds))


def f1_binary(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (label 1: MRPC 'equivalent', QQP 'duplicate')."""
    from sklearn.metrics import f1_score

    preds, gold = _check_pair(predictions, labels)
    return float(f1_score(gold, preds, pos_label=positive, average="binary", zero_division=0.0))


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    preds, gold = _check_pair(predictions, labels)
    if len(preds) < 2:
        raise ValueError("Pearson correlation needs at least 2 points")
    if np.ptp(preds.astype(np.float64)) == 0 or np.ptp(gold.astype(np.float64)) == 0:
        return 0.0  # undefined for a constant input; a constant predictor carries no correlation
    return float(pearsonr(preds.astype(np.float64), gold.astype(np.float64))[0])


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    preds, gold = _check_pair(predictions, labels)
    if len(preds) < 2:
        raise ValueError("Spearman correlation needs at least 2 points")
    if np.ptp(preds.astype(np.float64)) == 0 or np.ptp(gold.astype(np.float64)) == 0:
        return 0.0
    return float(spearmanr(preds.astype(np.float64), gold.astype(np.float64))[0])


def glue_metrics(task: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """All metrics of one task on one dev set. ``predictions`` are class ids, or scores for STS-B."""
    key = normalize_task_name(task)
    if key == "stsb":
        return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
    out = {"accuracy": accuracy(predictions, labels)}
    if key == "cola":
        out["matthews_corr"] = matthews_corr(predictions, labels)
    if key in ("mrpc", "qqp"):
        out["f1"] = f1_binary(predictions, labels)
    return out


_ALIASES = {
    "cola": "cola", "sst2": "sst2", "sst-2": "sst2", "mrpc": "mrpc", "qqp": "qqp", "mnli": "mnli",
    "qnli": "qnli", "rte": "rte", "stsb": "stsb", "sts-b": "stsb",
}


def normalize_task_name(task: str) -> str:
    """'SST-2', 'sst2', 'STS-B' -> 'sst2', 'stsb'; unknown names are an error listing the valid ones."""
    key = str(task).strip().lower().replace("_", "-")
    if key not in _ALIASES:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(set(_ALIASES.values()))}")
    return _ALIASES[key]


def median_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Median over seeds (the paper reports the median of 5 runs) and the spread around it:
    min, max and the sample standard deviation (ddof=1; 0 for a single run)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError("median_and_spread needs a non-empty list of numbers")
    return {
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "n": int(len(arr)),
    }
