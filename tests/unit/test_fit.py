"""train_model's early stopping keeps the epoch with the lowest validation loss."""

from __future__ import annotations

import numpy as np

from training.fit import TrainConfig, continuous_features, fit, train_model


def test_early_stopping_keeps_best_epoch():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 2))
    x = (z @ rng.normal(size=(2, 6)) + 0.05 * rng.normal(size=(400, 6))).astype(np.float32)
    config = TrainConfig(max_epochs=40, patience=5, penalty_weight=0.0)
    _, history = train_model(x[:300], x[300:], config, penalty_weight=0.0)
    assert history.best_epoch > 0
    assert history.val_loss[history.best_epoch] == min(history.val_loss)


def test_code_width_can_be_chosen():
    from training.fit import TrainConfig

    assert TrainConfig(code_dim=7).architecture(64).code_dim == 7
    assert TrainConfig().architecture(64).code_dim == 16  # a quarter of the input by default


def test_continuous_features_are_those_that_almost_never_repeat():
    rng = np.random.default_rng(0)
    n = 2000
    slow = np.repeat(rng.normal(size=n // 10), 10)  # updated every 10th row
    per_key = np.tile([1.5, 2.5, 3.5, 4.5], n // 4)  # constant per key, keys interleaved
    x = np.column_stack(
        [rng.normal(size=n), rng.integers(0, 50, n), slow, per_key, np.zeros(n)]
    ).astype(np.float32)
    assert continuous_features(x) == [True, False, False, False, False]


def test_the_manifest_names_the_continuous_features():
    x = np.random.default_rng(1).normal(size=(200, 3)).astype(np.float32)
    x[:, 2] = np.round(x[:, 2])
    m = fit(x, ["a", "b", "c"], TrainConfig(max_epochs=2)).manifest
    assert m.continuous == [True, True, False]
