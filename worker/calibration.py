"""The score tail of normal rows as a generalized Pareto distribution (GPD).

Beyond a high score `t` (an empirical quantile of the normal calibration scores), the
excesses y = score − t of normal rows follow, approximately, a GPD with scale σ > 0
and shape γ (Pickands–Balkema–de Haan; used for thresholds as in SPOT, Siffer et al.,
KDD 2017). With n calibration scores of which `n_peaks` exceed t:

    P(score > t + y) ≈ (n_peaks / n) · (1 + γ·y/σ)^(−1/γ)     (γ ≠ 0)
                     ≈ (n_peaks / n) · exp(−y/σ)               (γ ≈ 0)

For γ < 0 the tail ends at t + σ/|γ|; beyond it the survival is 0. The trainer fits
the tail (training/tail.py); this module is what the worker and the trainer share:
the manifest's description of the fit, its survival function (p-values beyond t) and
its quantile (thresholds beyond the calibration data). docs/contract.md#manifest.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

# How the manifest's threshold was obtained: the conformal order statistic of the
# calibration scores, or the GPD tail's quantile.
ThresholdMethod = Literal["empirical", "gpd"]

# |γ| below this is the exponential tail (the γ → 0 limit), computed as such.
EXPONENTIAL_GAMMA = 1e-6


class TailFit(BaseModel):
    """A GPD fitted to the normal calibration scores above `t`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    t: float  # the peaks threshold: an empirical high quantile of the calibration scores
    sigma: float = Field(gt=0)
    gamma: float = Field(ge=-1, le=10)
    n_peaks: int = Field(ge=1)  # calibration scores > t
    n: int = Field(ge=2)  # calibration scores in all

    @model_validator(mode="after")
    def _consistent(self) -> TailFit:
        if not (math.isfinite(self.t) and math.isfinite(self.sigma)):
            raise ValueError("tail t and sigma must be finite")
        if self.n_peaks >= self.n:
            raise ValueError(f"tail n_peaks {self.n_peaks} must be below n {self.n}")
        return self

    @property
    def tail_rate(self) -> float:
        """P(score > t): the share of calibration scores above t."""
        return self.n_peaks / self.n

    def quantile(self, rate: float) -> float:
        """The score a normal row exceeds with probability `rate` (< tail_rate), SPOT's
        z_q = t + σ/γ·((rate/tail_rate)^(−γ) − 1); t − σ·log(rate/tail_rate) when γ ≈ 0."""
        r = rate / self.tail_rate
        if abs(self.gamma) < EXPONENTIAL_GAMMA:
            return self.t - self.sigma * math.log(r)
        return self.t + self.sigma / self.gamma * (r ** (-self.gamma) - 1.0)

    def survival(self, scores: torch.Tensor) -> torch.Tensor:
        """P(score ≥ s) under the tail model for scores s ≥ t (float32, same device);
        0 past a bounded tail's end. Cheap and shape-static: fit for CUDA graphs."""
        y = (scores - self.t).clamp_min(0.0) / self.sigma
        if abs(self.gamma) < EXPONENTIAL_GAMMA:
            log_s = -y
        else:  # log1p(−1) = −inf past the end of a bounded (γ < 0) tail: survival 0
            log_s = torch.log1p((self.gamma * y).clamp_min(-1.0)) * (-1.0 / self.gamma)
        return log_s.exp() * self.tail_rate


def calibration_summary(scores: np.ndarray, max_points: int = 2001) -> list[float]:
    """Sorted calibration scores, thinned to evenly spaced quantiles when many."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) > max_points:
        s = np.quantile(s, np.linspace(0.0, 1.0, max_points))
    return [float(v) for v in s]
