"""The hyper-parameters of one training run (TrainConfig) and the choices they name.

Plain pydantic and Literals, no torch: the trainer's settings read their defaults
from here without loading torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.model_config import Activation, CAEConfig, ScoreKind

# How the contractive penalty is computed (training.penalty).
PenaltyMode = Literal["closed", "exact", "estimate"]
ScalerKind = Literal["standard", "robust"]


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run. Defaults serve every data set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code_dim: int | None = Field(default=None, gt=0)  # None: sized by input (CAEConfig.for_input)
    hidden: tuple[int, ...] = ()
    activation: Activation = "sigmoid"
    # λ swept over {0.01, 0.03, 0.1, 0.3, 1} on the tuning sets only (docs/eval/README.md,
    # "Choosing λ"): 1 gave the largest mean ROC-AUC gain over λ = 0 there
    penalty_weight: float | Literal["auto"] = 1.0
    penalty_mode: PenaltyMode = "closed"
    n_projections: int = Field(default=1, gt=0)
    scaler: ScalerKind = "standard"
    # "knn": mean distance to the `neighbours` nearest of up to `reference_rows` normal
    # training rows (docs/eval: it beat the reconstruction scores on the tuning sets);
    # "mae" / "mse": the autoencoder's reconstruction error
    score: ScoreKind = "knn"
    neighbours: int = Field(default=5, gt=0)
    reference_rows: int = Field(default=2048, gt=0)
    max_epochs: int = Field(default=300, gt=0)
    patience: int = Field(default=20, gt=0)
    batch_size: int = Field(default=128, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    holdout_fraction: float = Field(default=0.25, gt=0, lt=1)
    target_fpr: float = Field(default=0.01, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _enough_reference_rows(self) -> TrainConfig:
        if self.reference_rows <= self.neighbours:
            raise ValueError(
                f"--reference-rows ({self.reference_rows}) must exceed --neighbours "
                f"({self.neighbours})"
            )
        return self

    def architecture(self, input_dim: int) -> CAEConfig:
        over = {"hidden": self.hidden, "activation": self.activation}
        if self.code_dim is not None:
            over["code_dim"] = self.code_dim
        return CAEConfig.for_input(input_dim, **over)
