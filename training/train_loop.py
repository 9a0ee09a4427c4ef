"""The training loop: minibatch Adam on the CAE loss, early stopping on the validation loss.

Shared by fit (the product's run) and autotune (the short trial runs that choose λ).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from training.config import TrainConfig
from training.penalty import cae_loss
from worker.model import ContractiveAutoencoder


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    train_recon: list[float] = field(default_factory=list)
    train_penalty: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0


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
