"""GLUE metrics against hand-computed references (confusion-matrix formulas, float64 numpy)."""
import math

import numpy as np
import pytest

from loralab.metrics import glue as M

PRED = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1]


def _confusion(pred, gold):
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    return tp, tn, fp, fn


def test_accuracy_by_counting():
    tp, tn, fp, fn = _confusion(PRED, GOLD)
    assert (tp, tn, fp, fn) == (5, 3, 2, 2)  # the fixture really exercises every cell
    assert M.accuracy(PRED, GOLD) == pytest.approx((tp + tn) / len(GOLD), abs=1e-12)


def test_matthews_from_confusion_matrix():
    tp, tn, fp, fn = _confusion(PRED, GOLD)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_corr(PRED, GOLD) == pytest.approx(mcc, abs=1e-12)
    assert M.matthews_corr(GOLD, GOLD) == pytest.approx(1.0)
    assert M.matthews_corr([1 - g for g in GOLD], GOLD) == pytest.approx(-1.0)
    # constant predictor: a zero factor in the denominator -> 0 by convention
    assert M.matthews_corr([1] * len(GOLD), GOLD) == pytest.approx(0.0)


def test_f1_from_confusion_matrix():
    tp, tn, fp, fn = _confusion(PRED, GOLD)
    assert M.f1_binary(PRED, GOLD) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert M.f1_binary([0] * len(GOLD), GOLD) == 0.0


def _ranks(x):
    """Average ranks with ties, by hand (1-based)."""
    x = np.asarray(x, dtype=np.float64)
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = np.empty(len(x))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson64(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def test_pearson_and_spearman_vs_float64_formulas():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, size=50).round(1)  # rounding creates ties for Spearman
    pred = (gold + rng.normal(0, 1.0, size=50)).astype(np.float32)
    assert M.pearson(pred, gold) == pytest.approx(_pearson64(pred, gold), abs=1e-9)
    assert M.spearman(pred, gold) == pytest.approx(_pearson64(_ranks(pred), _ranks(gold)), abs=1e-9)
    assert M.pearson(pred, pred) == pytest.approx(1.0)
    assert M.pearson(np.ones(5), np.arange(5)) == 0.0  # constant prediction: no correlation


def test_glue_metrics_per_task():
    assert set(M.glue_metrics("CoLA", PRED, GOLD)) == {"accuracy", "matthews_corr"}
    assert set(M.glue_metrics("MRPC", PRED, GOLD)) == {"accuracy", "f1"}
    assert set(M.glue_metrics("qqp", PRED, GOLD)) == {"accuracy", "f1"}
    assert set(M.glue_metrics("SST-2", PRED, GOLD)) == {"accuracy"}
    assert set(M.glue_metrics("STS-B", [0.1, 2.0, 3.0], [0.0, 2.5, 2.9])) == {"pearson", "spearman"}
    mnli = M.glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2])
    assert mnli == {"accuracy": 0.75}
    for task in ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "stsb"]:
        assert M.MAIN_METRIC[task] in M.glue_metrics(task, [0, 1, 1], [0, 1, 0])


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        M.accuracy([], [])
    with pytest.raises(ValueError, match="unknown GLUE task"):
        M.glue_metrics("wnli2", [1], [1])


def test_median_and_spread():
    s = M.median_and_spread([0.9, 0.7, 0.8, 1.0, 0.6])
    assert s["median"] == pytest.approx(0.8)
    assert (s["min"], s["max"], s["n"]) == (0.6, 1.0, 5)
    assert s["std"] == pytest.approx(math.sqrt(sum((v - 0.8) ** 2 for v in [0.9, 0.7, 0.8, 1.0, 0.6]) / 4))
    assert M.median_and_spread([0.5])["std"] == 0.0
