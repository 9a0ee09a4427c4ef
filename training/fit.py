"""Fitting a detector: scaler on normal rows, CAE training with early stopping,
threshold calibration on held-out normal rows, and the checkpoint manifest.

This is the library the CLI (training.__main__) and the evaluation harness call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.autotune import choose_penalty_weight
from training.config import TrainConfig
from training.tail import calibrate, check_target
from training.train_loop import History, train_model
from worker.calibration import calibration_summary
from worker.checkpoint import Checkpoint, Golden, Manifest, Scaler
from worker.datafile import DataError  # noqa: F401 - re-exported for the trainer
from worker.model import ContractiveAutoencoder
from worker.scoring import Scorer

GOLDEN_ROWS = 8


def fit_scaler(x: np.ndarray, kind: str = "standard") -> Scaler:
    if kind == "robust":
        center = np.median(x, axis=0)
        q75, q25 = np.percentile(x, [75, 25], axis=0)
        scale = (q75 - q25) / 1.349  # IQR of a standard normal
        fallback = x.std(axis=0)
        scale = np.where(scale > 1e-12, scale, fallback)
    else:
        center = x.mean(axis=0)
        scale = x.std(axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
    return Scaler(kind=kind, center=[float(v) for v in center], scale=[float(v) for v in scale])


def apply_scaler(x: np.ndarray, scaler: Scaler) -> np.ndarray:
    c = np.asarray(scaler.center, dtype=np.float32)
    s = np.asarray(scaler.scale, dtype=np.float32)
    return ((x - c) / s).astype(np.float32)


@dataclass
class FitResult:
    model: ContractiveAutoencoder
    manifest: Manifest  # version/created_at/sha256 filled in by checkpoint.publish
    history: History
    holdout_scores: np.ndarray  # scores of the held-out normal rows (calibration set)

    def scorer(self, device: str = "cpu") -> Scorer:
        return Scorer(
            Checkpoint(path=Path("."), manifest=self.manifest, state_dict=self.model.state_dict()),
            device=device,
        )


def holdout_size(n: int, fraction: float) -> int:
    return max(1, int(round(n * fraction)))


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_hold = holdout_size(n, fraction)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def fit(
    x: np.ndarray,
    feature_names: list[str],
    config: TrainConfig | None = None,
    metrics: dict | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> FitResult:
    """Fit a detector on normal rows `x` (float, [N, D], input units)."""
    config = config or TrainConfig()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(feature_names):
        raise DataError(f"expected rows of {len(feature_names)} features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError("training rows contain NaN or Inf")
    if len(x) < 10:
        raise DataError(f"need at least 10 normal rows to train, got {len(x)}")
    train_idx, hold_idx = split_holdout(len(x), config.holdout_fraction, config.seed)
    check_target(config.target_fpr, len(hold_idx))  # before minutes of training
    scaler = fit_scaler(x[train_idx], config.scaler)
    xs = apply_scaler(x, scaler)
    if config.penalty_weight == "auto":
        weight = choose_penalty_weight(xs[train_idx], xs[hold_idx], config)
    else:
        weight = float(config.penalty_weight)
    model, history = train_model(xs[train_idx], xs[hold_idx], config, weight, on_epoch)
    arch = model.config
    placeholder = Manifest(
        feature_names=list(feature_names),
        input_dim=x.shape[1],
        architecture=arch,
        scaler=scaler,
        score=config.score,
        threshold=0.0,
        target_fpr=config.target_fpr,
        calibration=[0.0],
        penalty_weight=weight,
        golden=Golden(inputs=[[0.0] * x.shape[1]], scores=[0.0]),
    )
    result = FitResult(
        model=model, manifest=placeholder, history=history, holdout_scores=np.empty(0)
    )
    scorer = result.scorer()
    hold_scores = scorer.score_batch(x[hold_idx]).scores.astype(np.float64)
    calibration = calibrate(hold_scores, config.target_fpr)
    golden_x = x[hold_idx[:GOLDEN_ROWS]]
    golden_scores = scorer.score_batch(golden_x).scores
    result.manifest = placeholder.model_copy(
        update={
            "threshold": calibration.threshold,
            "threshold_method": calibration.method,
            "tail": calibration.tail,
            "calibration": calibration_summary(hold_scores),
            "golden": Golden(inputs=golden_x.tolist(), scores=[float(s) for s in golden_scores]),
            "metrics": {
                "train_rows": int(len(train_idx)),
                "holdout_rows": int(len(hold_idx)),
                "epochs": len(history.train_loss),
                "best_epoch": history.best_epoch,
                "final_train_loss": history.train_loss[history.best_epoch],
                "final_val_loss": history.val_loss[history.best_epoch],
                "seed": config.seed,
                **(metrics or {}),
            },
        }
    )
    # Re-validate the finished manifest (model_copy does not).
    result.manifest = Manifest.model_validate(result.manifest.model_dump())
    result.holdout_scores = hold_scores
    return result
