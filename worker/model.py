"""The contractive autoencoder module: layers and forward, no training logic."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

Activation = Literal["sigmoid", "tanh", "relu", "softplus", "elu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
}


class CAEConfig(BaseModel):
    """Plain architecture description; travels in the checkpoint manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_dim: int = Field(gt=0)
    code_dim: int = Field(gt=0)
    # Encoder layers between input and code; the decoder mirrors them.
    hidden: tuple[int, ...] = ()
    activation: Activation = "sigmoid"

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


class ContractiveAutoencoder(nn.Module):
    """Encoder: Linear + activation per layer, down to the code.

    Decoder: mirrors the hidden layers and ends in a linear layer (the input is
    standardised, so the reconstruction is unbounded).
    """

    def __init__(self, config: CAEConfig):
        super().__init__()
        self.config = config
        act = _ACTIVATIONS[config.activation]
        sizes = config.encoder_sizes
        self.encoder_linears = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.encoder_act = act()
        rev = sizes[::-1]
        layers: list[nn.Module] = []
        for a, b in zip(rev[:-2], rev[1:-1], strict=True):
            layers += [nn.Linear(a, b), act()]
        layers.append(nn.Linear(rev[-2], rev[-1]))
        self.decoder = nn.Sequential(*layers)

    def encode_with_preactivations(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pre: list[torch.Tensor] = []
        h = x
        for linear in self.encoder_linears:
            a = linear(h)
            pre.append(a)
            h = self.encoder_act(a)
        return h, pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for linear in self.encoder_linears:
            h = self.encoder_act(linear(h))
        return h

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
