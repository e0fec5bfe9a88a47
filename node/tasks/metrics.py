"""Binary classification metrics (numpy only): AUC, accuracy, sensitivity, specificity, MCC."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BinaryMetrics:
    """Metrics of probabilities against binary targets at one threshold."""

    n: int
    positives: int
    threshold: float
    auc: float
    """Area under the ROC curve (Mann-Whitney U / (P·N)); NaN with one class only."""
    accuracy: float
    sensitivity: float
    """True positive rate; NaN without positives."""
    specificity: float
    """True negative rate; NaN without negatives."""
    mcc: float
    """Matthews correlation coefficient (0 when a margin of the confusion matrix is empty)."""

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-friendly: NaN becomes ``None``."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of *scores* for binary *targets* (ties count one half)."""
    y = np.asarray(targets).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_metrics(
    targets: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5
) -> BinaryMetrics:
    """All metrics of *probabilities* (of the positive class) at *threshold*."""
    y = np.asarray(targets).astype(bool)
    p = np.asarray(probabilities, dtype=np.float64)
    predicted = p >= threshold
    tp = int(np.sum(predicted & y))
    tn = int(np.sum(~predicted & ~y))
    fp = int(np.sum(predicted & ~y))
    fn = int(np.sum(~predicted & y))
    n = len(y)
    denominator = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return BinaryMetrics(
        n=n,
        positives=tp + fn,
        threshold=threshold,
        auc=roc_auc(y, p),
        accuracy=(tp + tn) / n if n else float("nan"),
        sensitivity=tp / (tp + fn) if tp + fn else float("nan"),
        specificity=tn / (tn + fp) if tn + fp else float("nan"),
        mcc=(tp * tn - fp * fn) / denominator if denominator else 0.0,
    )
