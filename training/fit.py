"""Fitting a detector: scaler on normal rows, CAE training with early stopping,
threshold calibration on normal rows scored as new rows would be, and the checkpoint
manifest.

This is the library the CLI (training.__main__) and the evaluation harness call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.autotune import choose_penalty_weight
from training.config import TrainConfig
from training.tail import calibrate, check_target
from training.train_loop import History, train_model
from worker.calibration import calibration_summary
from worker.checkpoint import Checkpoint, Golden, Manifest, Scaler
from worker.datafile import DataError  # noqa: F401 - re-exported for the trainer
from worker.model import ContractiveAutoencoder
from worker.scoring import Scorer, nearest_neighbours

GOLDEN_ROWS = 8
# A feature is continuous (its repeats are evidence of a stuck sensor) when its training
# rows hold at least this share of distinct values ...
CONTINUOUS_DISTINCT = 0.9
# ... and a row repeats the row before it at most this often (docs/contract.md#stuck-features)
CONTINUOUS_REPEATS = 0.001


def continuous_features(x: np.ndarray) -> list[bool]:
    """Per feature of the training rows [N, D] (in the order given): does it almost
    never repeat a value? Counts, flags, set-points, quantised or slowly updated
    readings repeat, so they are not; a stuck feature is only one of these that holds
    its value (worker/repeats.py)."""
    n = len(x)
    distinct = np.asarray([len(np.unique(col)) for col in x.T]) / n
    repeats = (x[1:] == x[:-1]).mean(axis=0) if n > 1 else np.zeros(x.shape[1])
    return [
        bool(d >= CONTINUOUS_DISTINCT and r <= CONTINUOUS_REPEATS)
        for d, r in zip(distinct, repeats, strict=True)
    ]


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
    # the calibration set: scores of every normal row for the knn score (leave-one-out),
    # of the held-out normal rows for the reconstruction scores (calibration_rows)
    calibration_scores: np.ndarray

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


def calibration_rows(n: int, config: TrainConfig) -> int:
    """How many of n normal rows the threshold and p-values are calibrated on. The knn
    score does not use the autoencoder, so every normal row can be scored as a new row
    would be (leave_one_out_scores): all n. A reconstruction score can be trusted only
    on rows the autoencoder was not fitted to: the held-out rows."""
    return n if config.score == "knn" else holdout_size(n, config.holdout_fraction)


def reference_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Indices of the normal rows the knn score keeps: all of them, or a seeded random
    `max_rows` of them (sorted)."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 524287]).choice(n, size=max_rows, replace=False))


@torch.inference_mode()
def leave_one_out_scores(
    scorer: Scorer, x_rows: np.ndarray, row_idx: np.ndarray, ref_idx: np.ndarray
) -> np.ndarray:
    """The knn scores of normal rows (x_rows, at indices row_idx of the training rows) as
    a new row would get them: a row that is itself a reference row is scored against
    the other reference rows (its k + 1 nearest, itself left out), any other row
    against all of them, so the calibration scores are exchangeable with those of unseen
    normal rows. Computed with the scorer's own maths (float64 out)."""
    k = scorer.manifest.neighbours
    position = np.full(int(max(row_idx.max(), ref_idx.max())) + 1, -1)
    position[ref_idx] = np.arange(len(ref_idx))
    own = torch.from_numpy(position[row_idx])
    xd = torch.from_numpy(np.ascontiguousarray(x_rows, dtype=np.float32))
    xs = (xd - scorer._center) * scorer._inv_scale
    dist, index = nearest_neighbours(xs, scorer._reference, scorer._ref_sq, k + 1)
    drop = index == own[:, None]
    outside = ~drop.any(dim=1)  # not a reference row: drop its farthest of k + 1 instead
    drop[outside, dist[outside].argmax(dim=1)] = True
    return (dist.masked_fill(drop, 0.0).sum(dim=1) / k).double().numpy()


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
    check_target(config.target_fpr, calibration_rows(len(x), config))  # before training
    knn = config.score == "knn"
    # the knn score compares rows with every normal row (reference rows drawn from all of
    # them, calibration on all of them), so its scale comes from all of them too: a row's
    # own share in the scale moves its score by < 2 % even in the tail of a heavy-tailed
    # generator (docs/calibration.md)
    scaler = fit_scaler(x if knn else x[train_idx], config.scaler)
    xs = apply_scaler(x, scaler)
    if config.penalty_weight == "auto":
        weight = choose_penalty_weight(xs[train_idx], xs[hold_idx], config)
    else:
        weight = float(config.penalty_weight)
    model, history = train_model(xs[train_idx], xs[hold_idx], config, weight, on_epoch)
    ref_idx = None
    if knn:
        ref_idx = reference_rows(len(x), config.reference_rows, config.seed)
        model = model.with_reference(torch.from_numpy(xs[ref_idx]))
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
        continuous=continuous_features(x),
        neighbours=config.neighbours if knn else None,
        golden=Golden(inputs=[[0.0] * x.shape[1]], scores=[0.0]),
    )
    result = FitResult(
        model=model, manifest=placeholder, history=history, calibration_scores=np.empty(0)
    )
    scorer = result.scorer()
    if knn:  # every row, each as a new row would be scored (docs/calibration.md)
        cal_scores = leave_one_out_scores(scorer, x, np.arange(len(x)), ref_idx)
    else:  # the autoencoder was fitted to the other rows
        cal_scores = scorer.score_batch(x[hold_idx], explain="none").scores.astype(np.float64)
    calibration = calibrate(cal_scores, config.target_fpr)
    golden_x = x[hold_idx[:GOLDEN_ROWS]]
    golden_scores = scorer.score_batch(golden_x).scores
    result.manifest = placeholder.model_copy(
        update={
            "threshold": calibration.threshold,
            "threshold_method": calibration.method,
            "tail": calibration.tail,
            "calibration": calibration_summary(cal_scores),
            "golden": Golden(inputs=golden_x.tolist(), scores=[float(s) for s in golden_scores]),
            "metrics": {
                "train_rows": int(len(train_idx)),
                "holdout_rows": int(len(hold_idx)),
                "calibration_rows": int(len(cal_scores)),
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
    result.calibration_scores = cal_scores
    return result
