"""Detection metrics from labels (1 = anomaly) and scores (high = anomalous), numpy only.

Tied scores are one threshold: ROC-AUC counts a tied (anomaly, normal) pair as half
right, and average precision steps once per distinct score — both as scikit-learn
defines them. A metric that needs both classes is None when one is missing.
"""

from __future__ import annotations

import numpy as np


def _ranked_counts(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, threshold) at each distinct score, highest first."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = last_of_tie + 1 - tps
    return tps, fps, s[last_of_tie]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, threshold), starting at (0, 0, +inf)."""
    tps, fps, thresholds = _ranked_counts(labels, scores)
    n_pos, n_neg = max(int(tps[-1]), 1), max(int(fps[-1]), 1)
    return (
        np.r_[0.0, fps / n_neg],
        np.r_[0.0, tps / n_pos],
        np.r_[np.inf, thresholds],
    )


def _both_classes(labels: np.ndarray) -> bool:
    y = np.asarray(labels)
    return bool(len(y) and y.min() == 0 and y.max() == 1)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if not _both_classes(labels):
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Σ_n (R_n − R_{n−1}) P_n over distinct thresholds (area under the PR steps)."""
    if not _both_classes(labels):
        return None
    tps, fps, _ = _ranked_counts(labels, scores)
    precision = tps / (tps + fps)
    recall_steps = np.diff(np.r_[0, tps]) / tps[-1]
    return float(np.sum(recall_steps * precision))


def at_threshold(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, float | int | None]:
    """Confusion counts and rates for the decision score ≥ threshold."""
    y = np.asarray(labels).astype(bool)
    flagged = np.asarray(scores) >= threshold
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    fn, tn = int((~flagged & y).sum()), int((~flagged & ~y).sum())
    return {
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "true_negatives": tn,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
    }


def evaluate(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, float | int | None]:
    y = np.asarray(labels)
    return {
        "rows": int(len(y)),
        "anomalies": int(y.sum()),
        "roc_auc": roc_auc(y, scores),
        "average_precision": average_precision(y, scores),
        **at_threshold(y, scores, threshold),
    }
