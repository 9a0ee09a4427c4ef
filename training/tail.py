"""Calibrating the threshold on the scores of n normal rows scored as new rows would be
(the calibration rows: every normal row for the knn score, the held-out rows for a
reconstruction score; training.fit.calibration_rows): empirical where the data
suffice, a generalized Pareto tail (worker.calibration.TailFit) beyond them.

The rules (docs/contract.md#manifest):

* Peaks: t is the calibration score with max(MIN_PEAKS, ⌈PEAK_FRACTION·n⌉) scores above
  it (SPOT's 98 % level once n ≥ 2 500); no tail is fitted when that would take more
  than MAX_PEAK_FRACTION of the scores (n < 500), or when the fit fails.
* Threshold for a target rate α: the conformal order statistic of the n calibration
  scores while α·n ≥ EMPIRICAL_MIN_EXCEEDANCES (at least that many calibration rows
  lie above it, so its rate is measured, not guessed); below that, the tail's quantile.
* Lowest rate the data support: 1/(EXTRAPOLATION·n) with a tail, 1/(n + 1) without
  one (the conformal order statistic cannot go further). A lower target is refused.
  EXTRAPOLATION is measured, not chosen (docs/calibration.md): down to 1/n the tail's
  quantile delivered at most 1.34× its rate (knn, n = 20 000; far less on a heavy
  tail), while beyond it (1/(5n) for knn, 1/(2n) and 1/(20n) for the reconstruction
  score with n = 5 000) it missed by 2–20× either way, as its shape γ is estimated
  from a few hundred peaks. Lower targets need more normal rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from worker.calibration import EXPONENTIAL_GAMMA, TailFit, ThresholdMethod
from worker.datafile import DataError

PEAK_FRACTION = 0.02
MIN_PEAKS = 50
MAX_PEAK_FRACTION = 0.1
EMPIRICAL_MIN_EXCEEDANCES = 50
EXTRAPOLATION = 1.0
# A score has no upper end (residuals of unbounded inputs), so its tail is not bounded:
# γ < 0 fitted on a finite sample is noise (or a light tail seen at a finite level), and
# it would end the tail at t + σ/|γ|, leaving every stronger anomaly the same p-value 0.
# The fit is held to γ ≥ 0; an exponential tail (γ = 0) is the lightest it may take.
MIN_GAMMA = 0.0


class TargetRateUnsupported(DataError):
    """The target false-positive rate is below what the calibration rows can support."""

    def __init__(self, target: float, lowest: float, n: int, tail: bool):
        how = (
            f"the GPD tail fitted to them is trusted down to 1/{EXTRAPOLATION * n:g}"
            if tail
            else "too few of them to fit a tail; a threshold cannot be placed beyond the largest"
        )
        super().__init__(
            f"--target-fpr {target:g} is below what {n} normal calibration rows support "
            f"({how}): the lowest is {lowest:.3g}; train on more normal rows or raise --target-fpr"
        )
        self.lowest = lowest


@dataclass(frozen=True)
class Calibration:
    threshold: float
    method: ThresholdMethod
    tail: TailFit | None
    lowest_rate: float  # the lowest target these scores support


def peaks_count(n: int) -> int:
    return max(MIN_PEAKS, math.ceil(PEAK_FRACTION * n))


def can_fit_tail(n: int) -> bool:
    return peaks_count(n) <= MAX_PEAK_FRACTION * n


def lowest_supported_rate(n: int, tail: bool) -> float:
    return 1.0 / (EXTRAPOLATION * n) if tail else 1.0 / (n + 1)


def supported_target(target: float, n: int) -> float:
    """The target itself, or the lowest rate n calibration rows support when that is higher
    (the evaluation harness trains small data sets at what they can deliver)."""
    return max(target, lowest_supported_rate(n, can_fit_tail(n)))


def check_target(target: float, n: int) -> None:
    """Refuse before training a target that n calibration rows cannot support even when a
    tail fits (the fit itself can only make the bound stricter)."""
    lowest = lowest_supported_rate(n, can_fit_tail(n))
    if target < lowest:
        raise TargetRateUnsupported(target, lowest, n, can_fit_tail(n))


def fit_gpd(excesses: np.ndarray) -> tuple[float, float]:
    """(σ, γ) of a GPD fitted to excesses by maximum likelihood, γ ≥ MIN_GAMMA.

    The likelihood is profiled over θ = γ/σ (Grimshaw 1993): for a fixed θ the best
    γ is mean(log(1 + θ·y)), leaving a one-dimensional search, done on a grid over
    every admissible θ (θ > −1/max y) and refined around its best point twice.
    Raises ValueError when the excesses cannot be fitted (none, or all equal).
    """
    y = np.asarray(excesses, dtype=np.float64)
    if len(y) < 2 or not np.all(np.isfinite(y)) or y.min() < 0 or y.max() <= y.min():
        raise ValueError("excesses must be finite, non-negative and not all equal")
    n, mean, top = len(y), y.mean(), y.max()

    def profile(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(log-likelihood, γ) at each θ; −inf where γ < MIN_GAMMA."""
        theta = theta[:, None]
        safe = np.where(theta == 0, 1.0, theta)
        g = np.log1p(safe * y).mean(axis=1)
        zero = theta[:, 0] == 0
        ll = np.where(zero, -n * math.log(mean) - n, -n * np.log(g / safe[:, 0]) - n * g - n)
        g = np.where(zero, 0.0, g)
        return np.where(g >= MIN_GAMMA, ll, -np.inf), g

    steps = np.geomspace(1e-8, 1.0, 200)
    grid = np.unique(np.concatenate([-(1.0 - steps) / top, [0.0], steps * 1e4 / mean]))
    for _ in range(3):
        ll, g = profile(grid)
        best = int(np.argmax(ll))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        theta = grid[best]
        grid = np.linspace(lo, hi, 201)
    if theta == 0 or g[best] < EXPONENTIAL_GAMMA:  # at the γ ≥ 0 bound: exponential
        return float(mean), 0.0
    gamma = float(g[best])
    return float(gamma / theta), gamma


def fit_tail(scores: np.ndarray) -> TailFit | None:
    """The GPD tail of calibration scores above their peaks threshold, or None when there
    are too few scores or the fit fails."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if not can_fit_tail(n):
        return None
    t = s[n - peaks_count(n) - 1]
    peaks = s[s > t]
    if len(peaks) < MIN_PEAKS:  # ties at t
        return None
    try:
        sigma, gamma = fit_gpd(peaks - t)
    except ValueError:
        return None
    return TailFit(t=float(t), sigma=sigma, gamma=gamma, n_peaks=len(peaks), n=n)


def conformal_threshold(scores: np.ndarray, target_fpr: float) -> float:
    """Smallest threshold whose false-positive rate on `scores` is ≤ target_fpr.

    A row is anomalous when score ≥ threshold; with n normal calibration scores the
    threshold is the order statistic that leaves at most ⌊target·n⌋ rows at or above it
    (conformal: the expected FPR on new normal rows is then ≤ target).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    k = int(math.ceil((1 - target_fpr) * (n + 1)))  # 1-based rank
    if k > n:
        return float(np.nextafter(s[-1], np.inf))
    return float(np.nextafter(s[k - 1], np.inf))


def calibrate(scores: np.ndarray, target_fpr: float) -> Calibration:
    """The threshold for `target_fpr` from normal calibration scores, and how it was
    obtained. Raises TargetRateUnsupported for a target the scores cannot support."""
    n = len(scores)
    tail = fit_tail(scores)
    lowest = lowest_supported_rate(n, tail is not None)
    if target_fpr < lowest:
        raise TargetRateUnsupported(target_fpr, lowest, n, tail is not None)
    if tail is None or target_fpr * n >= EMPIRICAL_MIN_EXCEEDANCES:
        return Calibration(conformal_threshold(scores, target_fpr), "empirical", tail, lowest)
    return Calibration(tail.quantile(target_fpr), "gpd", tail, lowest)
