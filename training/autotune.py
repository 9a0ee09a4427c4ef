"""Choosing the contractive penalty weight λ from normal rows alone (no labels).

Criterion — held-out denoising error. Contraction's stated purpose is a code that
does not move when the input moves off the data manifold, so a good λ is one whose
model maps a *perturbed* normal row back to the clean row. For each candidate λ a
short training run fits the model on the training rows; it is then scored on the
held-out normal rows with small Gaussian noise added (σ = 0.1 in scaled units),
the error measured against the clean rows, with the same per-row score the product
serves (worker.scoring.errors_to_score). The λ with the lowest mean error wins.

* λ too small: the model reproduces the noise along with the row — high error.
* λ too large: the code collapses and clean structure is lost — high error too.

All trials share the seed, the noise draw and the rows, so the choice is
deterministic for a seed. Cost: one short run per candidate, on at most
``MAX_ROWS`` rows, ``TRIAL_STEPS`` optimiser steps each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from training.config import TrainConfig
from training.train_loop import train_model
from worker.scoring import errors_to_score

CANDIDATES: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
NOISE_SIGMA = 0.1
MAX_ROWS = 2000
TRIAL_STEPS = 600


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]


def denoising_errors(
    x_train: np.ndarray,
    x_val: np.ndarray,
    config: TrainConfig,
    candidates: Sequence[float] = CANDIDATES,
    sigma: float = NOISE_SIGMA,
) -> dict[float, float]:
    """Mean held-out denoising score for each candidate λ (scaled rows in, float out)."""
    # a reconstruction score: with the knn score (which does not use the autoencoder)
    # the λ still shapes the model, measured with the absolute error
    kind = "mae" if config.score == "knn" else config.score
    rng = np.random.default_rng([config.seed, 2718])
    xt = _subsample(x_train, MAX_ROWS, rng)
    xv = _subsample(x_val, MAX_ROWS, rng)
    noisy = torch.from_numpy((xv + sigma * rng.standard_normal(xv.shape)).astype(np.float32))
    clean = torch.from_numpy(xv)
    batches = max(1, math.ceil(len(xt) / config.batch_size))
    epochs = min(config.max_epochs, max(1, math.ceil(TRIAL_STEPS / batches)))
    trial = config.model_copy(
        update={"max_epochs": epochs, "patience": min(config.patience, epochs)}
    )
    out: dict[float, float] = {}
    for lam in candidates:
        model, _ = train_model(xt, xv, trial, float(lam))
        with torch.no_grad():
            err = (model(noisy) - clean).square()
            out[float(lam)] = float(errors_to_score(err, kind).mean())
    return out


def choose_penalty_weight(x_train: np.ndarray, x_val: np.ndarray, config: TrainConfig) -> float:
    """The candidate λ with the lowest held-out denoising error (ties: the smaller λ)."""
    errors = denoising_errors(x_train, x_val, config)
    return min(errors, key=lambda lam: (errors[lam], lam))
