"""What describes a model without building it: its architecture and its score kind.

Plain pydantic and Literals, no torch, so settings and tools can name them without
loading torch; worker.model builds the layers from a CAEConfig.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Activation = Literal["sigmoid", "tanh", "relu", "softplus", "elu"]

# How a row's score is computed: from its per-feature reconstruction errors
# (worker.scoring.errors_to_score: "mse", "mae"), or as its mean distance to the k
# nearest reference rows stored with the model ("knn", worker.scoring.nearest_neighbours).
ScoreKind = Literal["mse", "mae", "knn"]


class CAEConfig(BaseModel):
    """Plain architecture description; travels in the checkpoint manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_dim: int = Field(gt=0)
    code_dim: int = Field(gt=0)
    # Encoder layers between input and code; the decoder mirrors them.
    hidden: tuple[int, ...] = ()
    activation: Activation = "sigmoid"
    # Normal training rows (scaled units) stored with the weights for the "knn" score:
    # the model's `reference` buffer, [reference_rows, input_dim]; 0 = none (manifests
    # written before the knn score have no such field and read as 0).
    reference_rows: int = Field(default=0, ge=0)

    @classmethod
    def for_input(cls, input_dim: int, **overrides) -> CAEConfig:
        """Default architecture sized by the input: one sigmoid encoder layer.

        A single elementwise layer keeps the contractive penalty in closed form. The
        code is a quarter of the input width (at least 4, at most 128): on the
        evaluation sets (docs/eval) a narrow code separated anomalies better than an
        overcomplete one or a half-width one, with or without the penalty.
        """
        overrides.setdefault("code_dim", max(4, min(128, input_dim // 4)))
        return cls(input_dim=input_dim, **overrides)

    @property
    def encoder_sizes(self) -> list[int]:
        return [self.input_dim, *self.hidden, self.code_dim]
