"""A training run's report: report.json plus PNG plots (loss curves, scores, ROC).

The report lives outside the checkpoint (a version directory holds only the
weights and the manifest); by default in MODEL_DIR/.reports/VERSION/.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from training import metrics
from training.fit import FitResult, TrainConfig

REPORT_FILE = "report.json"


def build_report(
    result: FitResult,
    config: TrainConfig,
    version: str,
    data_summary: dict,
    scores: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict:
    """The report as plain data. `scores`/`labels` cover every labelled row when given."""
    m = result.manifest
    calibration = metrics.at_threshold(
        np.zeros(len(result.calibration_scores)), result.calibration_scores, m.threshold
    )
    evaluation = None
    if labels is not None and scores is not None:
        evaluation = {
            **metrics.evaluate(labels, scores, m.threshold),
            # The normal rows include those the model was fit on: an optimistic FPR.
            "includes_training_rows": True,
        }
    return {
        "version": version,
        "created_at": m.created_at,
        "data": data_summary,
        "config": config.model_dump(mode="json"),
        "architecture": m.architecture.model_dump(mode="json"),
        "penalty_weight": m.penalty_weight,
        "threshold": m.threshold,
        "target_fpr": m.target_fpr,
        "threshold_method": m.threshold_method,
        # the GPD fitted to the calibration scores above t (null when too few to fit one)
        "tail": m.tail.model_dump() | {"tail_rate": m.tail.tail_rate} if m.tail else None,
        "calibration": {
            "rows": len(result.calibration_scores),
            "fpr_at_threshold": calibration["fpr"],
        },
        "metrics": dict(m.metrics),
        "history": asdict(result.history),
        "evaluation": evaluation,
    }


def write_report(
    report_dir: Path, report: dict, result: FitResult, scores=None, labels=None
) -> list[Path]:
    """Write report.json and the plots into `report_dir`; returns the files written."""
    report_dir.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(report_dir, result, scores, labels)
    report = {**report, "plots": [p.name for p in plots]}
    path = report_dir / REPORT_FILE
    path.write_text(json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    return [path, *plots]


def _finite_or_null(obj):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite_or_null(obj.item())
    return obj


def _write_plots(report_dir: Path, result: FitResult, scores, labels) -> list[Path]:
    try:
        from matplotlib.figure import Figure  # Agg canvas, no pyplot global state
    except ImportError:
        return []  # plots are optional: the `train` extra installs matplotlib
    written = [_plot_losses(Figure, report_dir / "loss.png", result)]
    written.append(_plot_scores(Figure, report_dir / "scores.png", result, scores, labels))
    if labels is not None and scores is not None and metrics.roc_auc(labels, scores) is not None:
        written.append(_plot_roc(Figure, report_dir / "roc.png", labels, scores))
    return written


def _plot_losses(Figure, path: Path, result: FitResult) -> Path:
    h = result.history
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    epochs = np.arange(1, len(h.train_loss) + 1)
    ax.plot(epochs, h.train_loss, label="train loss")
    ax.plot(epochs, h.val_loss, label="validation loss")
    ax.plot(epochs, h.train_recon, label="train reconstruction", linestyle=":")
    ax.axvline(
        h.best_epoch + 1, color="grey", linestyle="--", label=f"best epoch {h.best_epoch + 1}"
    )
    ax.set(xlabel="epoch", ylabel="loss", title="Training")
    if min(h.train_loss + h.val_loss) > 0:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_scores(Figure, path: Path, result: FitResult, scores, labels) -> Path:
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    if scores is not None and labels is not None:
        groups = [("normal", scores[labels == 0]), ("anomaly", scores[labels == 1])]
    else:
        groups = [("calibration normal", result.calibration_scores)]
    every = np.concatenate([g for _, g in groups if len(g)])
    positive = every[every > 0]
    log_bins = len(positive) > 1 and positive.max() > positive.min()
    bins = np.geomspace(positive.min(), positive.max(), 60) if log_bins else 60
    for name, group in groups:
        if len(group):
            ax.hist(group, bins=bins, alpha=0.6, label=f"{name} ({len(group)})")
    if log_bins:
        ax.set_xscale("log")
    m = result.manifest
    ax.axvline(m.threshold, color="red", linestyle="--", label=f"threshold ({m.threshold_method})")
    if m.tail is not None:
        _plot_tail(ax, m.tail, len(groups[0][1]), bins)  # expected normal rows per bin
    ax.set(xlabel="score", ylabel="rows", title="Scores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_tail(ax, tail, n_rows: int, bins) -> None:
    """The fitted GPD's expected count of `n_rows` normal rows per bin above t, and t."""
    import torch

    edges = np.asarray(bins, dtype=np.float64) if not isinstance(bins, int) else None
    if edges is None:
        lo, hi = ax.get_xlim()
        edges = np.linspace(lo, hi, bins + 1)
    edges = edges[edges >= tail.t]
    if len(edges) < 2:
        return
    survival = tail.survival(torch.from_numpy(edges)).numpy()
    expected = n_rows * (survival[:-1] - survival[1:])
    label = f"GPD tail σ={tail.sigma:.3g} γ={tail.gamma:+.3f} ({tail.n_peaks} peaks)"
    ax.step(edges[:-1], expected, where="post", color="black", label=label)
    ax.axvline(tail.t, color="grey", linestyle=":", label="tail t")


def _plot_roc(Figure, path: Path, labels, scores) -> Path:
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"ROC-AUC {metrics.roc_auc(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path
