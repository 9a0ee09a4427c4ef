"""p-values from the calibration quantiles and the fitted tail are uniform on new normal
rows, the threshold's false-positive rate on them is near its target, the knn score's
calibration scores (every normal row, leave-one-out) are exchangeable with new rows'
scores, and a target the calibration rows cannot support is refused. (The 10⁶-row measurement down to 1e-5 is
`python -m training.tail_check`: docs/calibration.md.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from training.fit import TrainConfig, fit
from training.tail import TargetRateUnsupported, calibrate, fit_gpd
from worker.calibration import TailFit

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
    assert uniformity_pvalue(p, len(fitted.calibration_scores)) > 0.01


def test_ks_check_rejects_miscalibrated_p_values(fitted):
    # Normal rows whose noise is ~12% larger (0.2 → √(0.2² + 0.1²)): the calibration no longer describes
    # them, their p-values pile up near 0 and the same check must fail.
    x = normal_rows(N_NEW, seed=2)
    shifted = x + 0.1 * np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    p = fitted.scorer().score_batch(shifted).p_values
    assert uniformity_pvalue(p, len(fitted.calibration_scores)) < 0.01


def test_threshold_false_positive_rate_near_target(fitted):
    flagged = fitted.scorer().score_batch(normal_rows(N_NEW, seed=4)).is_anomaly
    fpr = flagged.mean()
    assert 0.5 * CONFIG.target_fpr <= fpr <= 2 * CONFIG.target_fpr, fpr


@pytest.mark.parametrize("score", ["knn", "mae"])
def test_knn_calibrates_on_every_normal_row_a_reconstruction_score_on_the_held_out(score):
    x = normal_rows(2400, seed=6)
    m = fit(x, [f"f{i}" for i in range(D)], TrainConfig(max_epochs=1, score=score)).manifest
    assert m.metrics["holdout_rows"] == 600
    rows = 2400 if score == "knn" else 600
    assert m.metrics["calibration_rows"] == rows and m.tail.n == rows


def test_knn_calibration_scores_are_exchangeable_with_new_rows():
    # 2 000 normal rows, all of them reference rows: each is calibrated against the other
    # reference rows. Scored in-sample instead (itself its nearest neighbour, at distance
    # 0) the threshold falls and 10-16 % of new rows would score above a 1 % threshold;
    # left out, 0.8-1.6 % per seed in 10 seeds, 1.05 % on average (the 20th largest of
    # 2 000 scores is a quantile between about 0.8 and 1.3 %: its Beta spread).
    rates = []
    for seed in range(6):
        x = normal_rows(2000, seed=100 + seed)
        config = TrainConfig(max_epochs=1, seed=seed)  # the knn score does not use the AE
        result = fit(x, [f"f{i}" for i in range(D)], config)
        assert result.manifest.architecture.reference_rows == len(x)
        new = result.scorer().score_batch(normal_rows(50_000, seed=200 + seed), "none")
        rates.append(new.is_anomaly.mean())
    assert all(0.5 * config.target_fpr <= r <= 2 * config.target_fpr for r in rates), rates
    assert 0.75 * config.target_fpr <= np.mean(rates) <= 1.33 * config.target_fpr, rates


# -- the tail: GPD fit, quantile, survival, the threshold rule, refusals ----------------


def gpd_draws(sigma: float, gamma: float, n: int, seed: int) -> np.ndarray:
    u = np.random.default_rng(seed).uniform(size=n)
    return -sigma * np.log(u) if gamma == 0 else sigma / gamma * (u ** (-gamma) - 1)


@pytest.mark.parametrize("gamma", [0.15, 0.3, 0.8])
def test_gpd_fit_is_the_maximum_likelihood(gamma):
    y = gpd_draws(1.5, gamma, 400, seed=1)
    sigma_hat, gamma_hat = fit_gpd(y)
    ref_gamma, _, ref_sigma = stats.genpareto.fit(y, floc=0)
    assert gamma_hat == pytest.approx(ref_gamma, abs=2e-3)
    assert sigma_hat == pytest.approx(ref_sigma, rel=2e-3)
    big_sigma, big_gamma = fit_gpd(gpd_draws(1.5, gamma, 50_000, seed=2))
    assert big_gamma == pytest.approx(gamma, abs=0.03) and big_sigma == pytest.approx(1.5, rel=0.05)


def test_a_bounded_sample_gets_the_exponential_tail_not_an_end():
    # uniform excesses: the unconstrained fit is γ = −1, a tail that ends at max y
    sigma, gamma = fit_gpd(np.random.default_rng(0).uniform(size=500))
    assert gamma == 0.0 and sigma == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("gamma", [-0.4, 0.0, 1e-8, 0.3])
def test_tail_quantile_and_survival_invert_each_other(gamma):
    tail = TailFit(t=2.0, sigma=0.5, gamma=gamma, n_peaks=100, n=5000)
    rates = [1e-2, 1e-4, 1e-6]
    z = torch.tensor([tail.quantile(r) for r in rates], dtype=torch.float64)
    assert tail.survival(z).tolist() == pytest.approx(rates, rel=1e-6)
    assert tail.survival(torch.tensor([2.0], dtype=torch.float64)).item() == pytest.approx(0.02)


def test_bounded_tail_survival_is_zero_past_its_end():
    tail = TailFit(t=1.0, sigma=1.0, gamma=-0.5, n_peaks=50, n=1000)  # ends at t + 2
    assert tail.survival(torch.tensor([2.999, 3.5, 1e30])).tolist()[1:] == [0.0, 0.0]


def test_threshold_is_empirical_where_the_data_suffice_and_gpd_beyond():
    scores = np.random.default_rng(0).gamma(2.0, size=5000)
    assert calibrate(scores, 0.01).method == "empirical"  # 50 calibration rows above it
    below = calibrate(scores, 0.002)
    assert below.method == "gpd" and below.tail.n_peaks == 100 and below.tail.n == 5000
    # the tail's quantile of a Gamma(2) sample is near the true one
    assert below.threshold == pytest.approx(stats.gamma(2.0).isf(0.002), rel=0.05)
    assert calibrate(scores, 1 / 5000).threshold > calibrate(scores, 0.002).threshold


def test_a_target_the_data_cannot_support_is_refused_naming_the_lowest():
    scores = np.random.default_rng(0).gamma(2.0, size=1250)
    with pytest.raises(TargetRateUnsupported, match=r"the lowest is 0\.0008\b") as e:
        calibrate(scores, 1e-5)
    assert e.value.lowest == pytest.approx(1 / 1250)
    with pytest.raises(TargetRateUnsupported, match=r"too few of them to fit a tail.*0\.0099"):
        calibrate(scores[:100], 0.005)  # no tail: the conformal limit 1/(n + 1)


def test_refused_before_training():
    x = normal_rows(400, seed=5)
    with pytest.raises(TargetRateUnsupported):
        fit(x, [f"f{i}" for i in range(D)], CONFIG.model_copy(update={"target_fpr": 1e-4}))


def test_p_values_keep_falling_beyond_the_held_out_scores(fitted):
    m = fitted.manifest
    assert m.tail is not None and m.tail.gamma >= 0
    x = np.repeat(normal_rows(1, seed=9), 6, axis=0)
    # ever stronger anomalies, ~2-6 standard deviations of f0 and then absurd; the
    # default (knn) score grows like the distance, its tail is about exponential
    x[:, 0] += np.array([0, 2, 3, 4, 6, 1e6], dtype=np.float32)
    got = fitted.scorer().score_batch(x)
    assert np.all(np.diff(got.scores) > 0)
    beyond = got.scores > max(fitted.calibration_scores)
    assert beyond[1:].all()
    assert np.all(np.diff(got.p_values[1:-1]) < 0)
    assert got.p_values[-1] <= got.p_values[-2]  # may underflow to float32's smallest
    assert got.p_values[1] < 1 / (len(fitted.calibration_scores) + 1)
    assert got.p_values.min() > 0


def test_a_tail_threshold_meets_its_target_on_new_rows(fitted):
    # 8 000 calibration rows (the knn default: all of them); a target of 1/n (one row
    # above it) comes from the tail. These rows' tail is bounded (tanh of the factors); held to γ ≥ 0 the fit errs on the
    # safe side there: fewer false positives than the target, never many more.
    n = len(fitted.calibration_scores)
    cal = calibrate(fitted.calibration_scores, 1 / n)
    assert cal.method == "gpd"
    scores = fitted.scorer().score_batch(normal_rows(200_000, seed=11), "none").scores
    fpr = np.mean(scores >= cal.threshold)
    assert 0.1 / n <= fpr <= 2 / n, fpr
