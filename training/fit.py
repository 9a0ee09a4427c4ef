"""Fitting a detector: scaler on normal rows, CAE training with early stopping,
threshold calibration on held-out normal rows, and the checkpoint manifest.

This is the library the CLI (training.__main__) and the evaluation harness call.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from training.penalty import PenaltyMode, cae_loss
from worker.checkpoint import Checkpoint, Golden, Manifest, Scaler, calibration_summary
from worker.datafile import DataError  # noqa: F401 - re-exported for the trainer
from worker.model import Activation, CAEConfig, ContractiveAutoencoder
from worker.scoring import ScoreKind, Scorer

GOLDEN_ROWS = 8


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run. Defaults serve every data set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code_dim: int | None = Field(default=None, gt=0)  # None: sized by input (CAEConfig.for_input)
    hidden: tuple[int, ...] = ()
    activation: Activation = "sigmoid"
    penalty_weight: float | Literal["auto"] = 0.1
    penalty_mode: PenaltyMode = "closed"
    n_projections: int = Field(default=1, gt=0)
    scaler: Literal["standard", "robust"] = "standard"
    score: ScoreKind = "mae"
    max_epochs: int = Field(default=300, gt=0)
    patience: int = Field(default=20, gt=0)
    batch_size: int = Field(default=128, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    holdout_fraction: float = Field(default=0.25, gt=0, lt=1)
    target_fpr: float = Field(default=0.01, gt=0, lt=1)
    seed: int = 0

    def architecture(self, input_dim: int) -> CAEConfig:
        over = {"hidden": self.hidden, "activation": self.activation}
        if self.code_dim is not None:
            over["code_dim"] = self.code_dim
        return CAEConfig.for_input(input_dim, **over)


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
class History:
    train_loss: list[float] = field(default_factory=list)
    train_recon: list[float] = field(default_factory=list)
    train_penalty: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0


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


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_hold = max(1, int(round(n * fraction)))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def train_model(
    x_train: np.ndarray,
    x_val: np.ndarray,
    config: TrainConfig,
    penalty_weight: float,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> tuple[ContractiveAutoencoder, History]:
    """Train on scaled rows with early stopping on the validation loss."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = ContractiveAutoencoder(config.architecture(x_train.shape[1]))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    xt = torch.from_numpy(x_train)
    xv = torch.from_numpy(x_val)
    history = History()
    best_state, best_val, stale = copy.deepcopy(model.state_dict()), math.inf, 0
    n = len(xt)
    for epoch in range(config.max_epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        sums = np.zeros(3)
        for start in range(0, n, config.batch_size):
            xb = xt[perm[start : start + config.batch_size]]
            loss, recon, pen = cae_loss(
                model, xb, penalty_weight, config.penalty_mode, config.n_projections, gen
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += np.array([loss.item(), recon.item(), pen.item()]) * len(xb)
        model.eval()
        # Validation uses the exact penalty (closed form), whatever mode trains.
        with torch.enable_grad():
            val_loss = cae_loss(model, xv, penalty_weight, "closed")[0].item()
        history.train_loss.append(sums[0] / n)
        history.train_recon.append(sums[1] / n)
        history.train_penalty.append(sums[2] / n)
        history.val_loss.append(val_loss)
        if on_epoch:
            on_epoch(epoch, sums[0] / n, val_loss)
        # inf - inf is nan, so the first epoch is taken explicitly.
        if epoch == 0 or val_loss < best_val - 1e-6 * abs(best_val):
            best_val, stale, history.best_epoch = val_loss, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), history


def calibrate_threshold(scores: np.ndarray, target_fpr: float) -> float:
    """Smallest threshold whose false-positive rate on `scores` is ≤ target_fpr.

    A row is anomalous when score ≥ threshold; with n held-out normal scores the
    threshold is the order statistic that leaves at most ⌊target·n⌋ rows at or above it
    (conformal: the expected FPR on new normal rows is then ≤ target).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    k = int(math.ceil((1 - target_fpr) * (n + 1)))  # 1-based rank
    if k > n:
        return float(np.nextafter(s[-1], np.inf))
    return float(np.nextafter(s[k - 1], np.inf))


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
    scaler = fit_scaler(x[train_idx], config.scaler)
    xs = apply_scaler(x, scaler)
    if config.penalty_weight == "auto":
        from training.autotune import choose_penalty_weight

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
    golden_x = x[hold_idx[:GOLDEN_ROWS]]
    golden_scores = scorer.score_batch(golden_x).scores
    result.manifest = placeholder.model_copy(
        update={
            "threshold": calibrate_threshold(hold_scores, config.target_fpr),
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
