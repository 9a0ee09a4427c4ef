"""Fixtures both test tiers share."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import normal_rows
from training.fit import FitResult, TrainConfig, fit

TINY_FEATURES = ["a", "b", "c", "d"]


@pytest.fixture(scope="session")
def tiny_rows() -> np.ndarray:
    """The rows tiny_model was fitted on."""
    return normal_rows(400, seed=0, dim=len(TINY_FEATURES), factors=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_rows) -> FitResult:
    """A four-feature model fitted in about a second, for tests of checkpoints and
    scoring mechanics (not of detection quality). Publish it; do not mutate it."""
    return fit(tiny_rows, TINY_FEATURES, TrainConfig(max_epochs=3, seed=0))
