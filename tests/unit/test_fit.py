"""train_model's early stopping keeps the epoch with the lowest validation loss."""

from __future__ import annotations

import numpy as np

from training.fit import TrainConfig, train_model


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
