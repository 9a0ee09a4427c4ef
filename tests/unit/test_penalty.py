"""The contractive penalty in every mode against the full Jacobian from torch.func."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import jacrev, vmap

from training.penalty import (
    _OneLayerCode,
    cae_loss,
    closed_form_penalty,
    contractive_penalty,
    estimated_penalty,
    exact_penalty,
    projected_penalty,
)
from worker.model import CAEConfig, ContractiveAutoencoder

ACTIVATIONS = ["sigmoid", "tanh", "relu", "softplus", "elu"]
DEPTHS = {0: (), 1: (7,), 2: (7, 5)}


def make_model(activation: str, hidden: tuple[int, ...], seed: int = 0) -> ContractiveAutoencoder:
    torch.manual_seed(seed)
    config = CAEConfig(input_dim=6, code_dim=4, hidden=hidden, activation=activation)
    return ContractiveAutoencoder(config).double()


def reference_penalty(model: ContractiveAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the sum of squared Jacobian entries, from jacrev."""
    jac = vmap(jacrev(model.encode))(x)
    return jac.square().sum(dim=(1, 2)).mean()


def inputs(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("activation", "depth"), list(itertools.product(ACTIVATIONS, DEPTHS)))
def test_closed_and_exact_match_the_jacobian(activation, depth):
    model, x = make_model(activation, DEPTHS[depth]), inputs()
    want = reference_penalty(model, x)
    closed, _ = closed_form_penalty(model, x)
    exact = exact_penalty(model.encode, x)
    assert want > 0
    torch.testing.assert_close(closed, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("depth", DEPTHS)
def test_estimate_is_unbiased_within_its_standard_error(depth):
    model, x = make_model("tanh", DEPTHS[depth]), inputs(8)
    want = reference_penalty(model, x).item()
    gen = torch.Generator().manual_seed(123)
    draws = torch.stack([estimated_penalty(model.encode, x, 1, gen) for _ in range(400)])
    se = (draws.std() / len(draws) ** 0.5).item()
    assert abs(draws.mean().item() - want) < 5 * se


@pytest.mark.parametrize(("activation", "depth"), list(itertools.product(ACTIVATIONS, DEPTHS)))
def test_projected_estimate_is_the_jvp_estimate(activation, depth):
    """Forward-mode by hand draws the same v and computes the same J v as torch.func.jvp."""
    model, x = make_model(activation, DEPTHS[depth]), inputs(5)
    by_hand, code = projected_penalty(model, x, 3, torch.Generator().manual_seed(9))
    by_jvp = estimated_penalty(model.encode, x, 3, torch.Generator().manual_seed(9))
    torch.testing.assert_close(by_hand, by_jvp, rtol=1e-10, atol=0)
    torch.testing.assert_close(code, model.encode(x))


@pytest.mark.parametrize("depth", DEPTHS)
def test_projected_estimate_is_unbiased(depth):
    model, x = make_model("softplus", DEPTHS[depth]), inputs(8)
    want = reference_penalty(model, x).item()
    gen = torch.Generator().manual_seed(321)
    draws = torch.stack([projected_penalty(model, x, 1, gen)[0] for _ in range(400)])
    assert abs(draws.mean().item() - want) < 5 * (draws.std() / len(draws) ** 0.5).item()


def test_estimate_error_shrinks_with_projections():
    # One row, so 16 projections stay a tiny batch (fast on a busy 2-core machine).
    model, x = make_model("sigmoid", (7,)), inputs(1)
    gen = torch.Generator().manual_seed(7)

    def spread(k: int) -> float:
        return (
            torch.stack([estimated_penalty(model.encode, x, k, gen) for _ in range(150)])
            .std()
            .item()
        )

    one, sixteen = spread(1), spread(16)
    # Hutchinson variance falls as 1/k: the spread by ~4x for 16 projections.
    assert sixteen < one / 2


@pytest.mark.parametrize("depth", DEPTHS)
def test_penalty_gradient_reaches_every_encoder_layer(depth):
    x = inputs()
    grads = {}
    for mode in ("closed", "exact"):
        model = make_model("sigmoid", DEPTHS[depth])
        contractive_penalty(model, x, mode).backward()
        grads[mode] = [lin.weight.grad.clone() for lin in model.encoder_linears]
        assert all(g is not None and g.abs().sum() > 0 for g in grads[mode])
    for g_closed, g_exact in zip(grads["closed"], grads["exact"], strict=True):
        torch.testing.assert_close(g_closed, g_exact, rtol=1e-6, atol=1e-12)


def test_one_layer_sigmoid_is_a_sum_of_squares_by_hand():
    model = make_model("sigmoid", ())
    x = inputs(3)
    w = model.encoder_linears[0].weight
    h = torch.sigmoid(x @ w.T + model.encoder_linears[0].bias)
    dh = h * (1 - h)
    by_hand = sum(
        (dh[n, j] ** 2 * w[j, i] ** 2).item()
        for n in range(3)
        for j in range(w.shape[0])
        for i in range(w.shape[1])
    )
    square_of_sum = sum((dh[n] @ w).square().sum().item() for n in range(3))
    closed, _ = closed_form_penalty(model, x)
    assert closed.item() == pytest.approx(by_hand / 3, rel=1e-12)
    assert closed.item() != pytest.approx(square_of_sum / 3, rel=1e-3)


def test_cae_loss_scales_lambda_the_same_in_every_mode():
    model, x = make_model("sigmoid", (7,)), inputs()
    gen = torch.Generator().manual_seed(0)
    penalty = reference_penalty(model, x)
    recon = (model(x) - x).square().mean()
    for mode in ("closed", "exact"):
        loss, r, p = cae_loss(model, x, 0.5, mode)
        torch.testing.assert_close(r, recon)
        torch.testing.assert_close(p, penalty, rtol=1e-6, atol=0)
        torch.testing.assert_close(loss, recon + 0.5 * penalty, rtol=1e-6, atol=0)
    xs = x[:4]  # small batches: the estimator's draws stay cheap
    want = reference_penalty(model, xs)
    draws = []
    for _ in range(200):
        loss, r, p = cae_loss(model, xs, 0.5, "estimate", 4, gen)
        torch.testing.assert_close(loss, r + 0.5 * p)
        draws.append(p)
    draws = torch.stack(draws)
    assert abs(draws.mean() - want) < 5 * draws.std() / len(draws) ** 0.5


def test_zero_weight_is_plain_reconstruction():
    model, x = make_model("sigmoid", ()), inputs()
    loss, recon, penalty = cae_loss(model, x, 0.0, "closed")
    assert penalty.item() == 0.0
    torch.testing.assert_close(loss, (model(x) - x).square().mean())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_layer_fused_node_passes_gradcheck(activation):
    """The one-layer closed form is a hand-written autograd.Function: check it numerically."""
    model = make_model(activation, ())
    linear = model.encoder_linears[0]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, linear.in_features, generator=gen, dtype=torch.float64)
    weight = linear.weight.detach().clone()
    bias = linear.bias.detach().clone()
    # relu/elu have a kink at 0, where finite differences (eps 1e-6) would straddle it
    assert (torch.addmm(bias, x, weight.t()).abs() > 1e-3).all()

    def code_and_penalty(x, w, b):
        return _OneLayerCode.apply(x, w, b, activation, model.encoder_act)

    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(code_and_penalty, args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_layer_cae_loss_gradients_match_autograd_through_jacrev(activation):
    """Every parameter's gradient of the closed-mode loss (reconstruction through the
    fused node's code, plus λ·penalty) equals plain autograd on the jacrev penalty."""
    x = inputs()
    grads = {}
    for how in ("closed", "reference"):
        model = make_model(activation, ())
        if how == "closed":
            loss = cae_loss(model, x, 0.7, "closed")[0]
        else:
            loss = (model(x) - x).square().mean() + 0.7 * reference_penalty(model, x)
        loss.backward()
        grads[how] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert all(g.abs().sum() > 0 for g in grads[how].values())
    for name, want in grads["reference"].items():
        torch.testing.assert_close(grads["closed"][name], want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_layer_closed_form_without_autograd_is_the_same(activation):
    model, x = make_model(activation, ()), inputs()
    with_graph, code = closed_form_penalty(model, x)
    with torch.no_grad():
        without, code_ng = closed_form_penalty(model, x)
    assert with_graph.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_graph, rtol=1e-12, atol=0)
    torch.testing.assert_close(code_ng, code.detach(), rtol=0, atol=0)
    torch.testing.assert_close(code, model.encode(x), rtol=0, atol=0)
