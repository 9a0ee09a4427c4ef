"""p-values from the calibration quantiles are uniform on new normal rows, and the
threshold's false-positive rate on them is near its target."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from training.fit import TrainConfig, fit

D = 8
CONFIG = TrainConfig(max_epochs=15, batch_size=256, seed=0)
N_TRAIN, N_NEW = 8000, 4000


def normal_rows(n: int, seed: int) -> np.ndarray:
    """Correlated readings: two latent factors through a fixed mixing, plus noise."""
    mixing = np.random.default_rng(12345).normal(size=(2, D))
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    return (np.tanh(z) @ mixing + 0.2 * rng.normal(size=(n, D))).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    return fit(normal_rows(N_TRAIN, seed=1), [f"f{i}" for i in range(D)], CONFIG)


def uniformity_pvalue(p_values: np.ndarray, n_calibration: int) -> float:
    """KS test of p-values against uniform, allowing for the calibration's own noise.

    The calibration is itself a sample of n normal scores, so given it the p-values
    of m new rows are uniform only up to its sampling error: the KS distance then
    follows the two-sample law, with effective size n·m/(n+m).
    """
    m = len(p_values)
    d = stats.kstest(p_values, "uniform").statistic
    return float(stats.kstwo.sf(d, round(n_calibration * m / (n_calibration + m))))


def test_p_values_uniform_on_held_out_normal_rows(fitted):
    p = fitted.scorer().score_batch(normal_rows(N_NEW, seed=2)).p_values
    assert uniformity_pvalue(p, len(fitted.holdout_scores)) > 0.01


def test_ks_check_rejects_miscalibrated_p_values(fitted):
    # Normal rows whose noise is ~12% larger (0.2 → √(0.2² + 0.1²)): the calibration no longer describes
    # them, their p-values pile up near 0 and the same check must fail.
    x = normal_rows(N_NEW, seed=2)
    shifted = x + 0.1 * np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    p = fitted.scorer().score_batch(shifted).p_values
    assert uniformity_pvalue(p, len(fitted.holdout_scores)) < 0.01


def test_threshold_false_positive_rate_near_target(fitted):
    flagged = fitted.scorer().score_batch(normal_rows(N_NEW, seed=4)).is_anomaly
    fpr = flagged.mean()
    assert 0.5 * CONFIG.target_fpr <= fpr <= 2 * CONFIG.target_fpr, fpr
