"""The contractive autoencoder module: layers and forward, no training logic.

Its plain description (CAEConfig, Activation) lives in worker.model_config.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.model_config import CAEConfig

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
}


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
        # the knn score's reference rows travel in the state dict, so they are written,
        # hashed and shape-checked with the weights (worker/checkpoint.py)
        rows = config.reference_rows
        self.register_buffer("reference", torch.zeros(rows, config.input_dim) if rows else None)

    def with_reference(self, reference: torch.Tensor) -> ContractiveAutoencoder:
        """A copy of this model (same weights) that stores `reference` rows [M, D]."""
        config = self.config.model_copy(update={"reference_rows": int(reference.shape[0])})
        model = ContractiveAutoencoder(CAEConfig.model_validate(config.model_dump()))
        state = {k: v for k, v in self.state_dict().items() if k != "reference"}
        model.load_state_dict({**state, "reference": reference.detach().float().cpu()})
        return model.eval()

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
