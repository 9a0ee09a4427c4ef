"""The contractive penalty ‖J_f(x)‖²_F, J_f the Jacobian of the code w.r.t. the input.

Convention (fixed, so λ means the same in every mode): the penalty of a batch is
the *mean over rows* of each row's squared Frobenius norm — the sum over every
(code unit, input feature) entry of J², not a mean over entries. Training loss is
``reconstruction + λ · penalty`` with reconstruction the mean over rows of each
row's mean squared error.

Modes:

* ``closed`` — exact, no autograd Jacobian. For an elementwise activation φ the
  layer Jacobian is diag(φ'(a)) W, with φ' read from the layer's own output
  (sigmoid: h(1−h); tanh: 1−h²; …, never the sigmoid formula for another
  activation). One layer: Σ_j φ'(a_j)² Σ_i W_ji². Deeper encoders: the chain
  diag(φ'_L) W_L ⋯ diag(φ'_1) W_1 is multiplied out per row, every layer counted.
* ``exact`` — the full Jacobian from ``torch.func.jacrev`` under ``vmap``; works for
  any encoder, costs one backward pass per code unit.
* ``estimate`` — unbiased Hutchinson estimate: for Rademacher v (E[vvᵀ] = I),
  E‖J v‖² = ‖J‖²_F. J v is pushed forward through the layers by hand,
  t ← φ'(a) ⊙ (W t), reusing the encoder's own forward pass (``projected_penalty``);
  ``estimated_penalty`` computes the same draws with ``torch.func.jvp`` for any
  encode function. Standard error per row ≤ sqrt(2/k)·‖J‖²_F for k projections.

Weights are always used from the graph (never detached), so the penalty's
gradient reaches every encoder layer.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.func import jacrev, jvp, vmap

from training.config import PenaltyMode
from worker.model import ContractiveAutoencoder


def activation_derivative(activation: str, pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """φ'(a) for the model's elementwise activations, from pre-activation a and φ(a)."""
    if activation == "sigmoid":
        return torch.addcmul(out, out, out, value=-1)  # h (1 − h), one op
    if activation == "tanh":
        return 1 - out.square()
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    if activation == "softplus":
        return torch.sigmoid(pre)
    if activation == "elu":
        return torch.where(pre > 0, torch.ones_like(pre), out + 1)
    raise ValueError(f"no closed form for activation {activation!r}")


def derivative_times_second(
    activation: str, pre: torch.Tensor, out: torch.Tensor, d: torch.Tensor, d2: torch.Tensor
) -> torch.Tensor | None:
    """φ'(a) φ''(a) from a, φ(a), d = φ'(a) and d2 = φ'(a)²; None where φ'' is zero almost
    everywhere (relu). One op each: this runs once per training step."""
    if activation == "sigmoid":
        return torch.addcmul(d2, d2, out, value=-2)  # φ'' = φ' (1 − 2h)
    if activation == "tanh":
        return torch.mul(d2, out).mul_(-2)  # φ'' = −2 h φ'
    if activation == "relu":
        return None
    if activation == "softplus":
        return torch.addcmul(d2, d2, d, value=-1)  # φ' = σ(a), φ'' = φ' (1 − φ')
    if activation == "elu":
        return torch.where(pre > 0, 0.0, d2)  # φ'' = φ' = e^a for a ≤ 0
    raise ValueError(f"no closed form for activation {activation!r}")


class _OneLayerCode(torch.autograd.Function):
    """(h, p) = (φ(x Wᵀ + b), mean over rows of Σ_j φ'(a_j)² Σ_i W_ji²), one autograd node.

    The whole one-layer encoder — its Linear, its activation and the ~9 small nodes
    of the penalty — in one node: at batch 256 a training step is per-op overhead,
    not arithmetic, and W's two gradients (through a, and the penalty's direct part)
    are formed in one addmm instead of two nodes and an accumulation. With
    a = x Wᵀ + b, d = φ'(a), s_j = Σ_i W_ji², c_j = mean_n d_nj²:

        ∂L/∂a = d ⊙ ∂L/∂h + ∂L/∂p · (2/B) s ⊙ d ⊙ φ''(a)
        ∂L/∂W = (∂L/∂a)ᵀ x + ∂L/∂p · 2 c ⊙ W        ∂L/∂b = Σ_n ∂L/∂a        ∂L/∂x = ∂L/∂a W

    Exact, first order only (``once_differentiable``); not for torch.func transforms
    (use `exact_penalty` or `estimated_penalty` there). Only called with autograd
    recording.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation, act_fn):
        n = x.shape[0]
        pre = torch.addmm(bias, x, weight.t())
        out = act_fn(pre)
        d = activation_derivative(activation, pre, out)
        d2 = d * d
        c = d2.sum(dim=0)  # n × the mean over rows of φ'(a_j)², per code unit j
        s = (weight * weight).sum(dim=1)  # Σ_i W_ji², per code unit j
        ddd = derivative_times_second(activation, pre, out, d, d2)
        ctx.x, ctx.weight, ctx.d, ctx.c2 = x, weight, d, c * (2 / n)
        ctx.grad_pre_of_penalty = None if ddd is None else ddd.mul_(s * (2 / n))
        return out, torch.dot(c, s).div_(n)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_penalty):
        grad_pre = ctx.d * grad_out
        if ctx.grad_pre_of_penalty is not None:
            grad_pre = torch.addcmul(grad_pre, ctx.grad_pre_of_penalty, grad_penalty)
        direct = ctx.weight * (ctx.c2 * grad_penalty).unsqueeze(1)
        grad_weight = torch.addmm(direct, grad_pre.t(), ctx.x)
        grad_x = grad_pre @ ctx.weight if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, grad_pre.sum(dim=0), None, None


def _one_layer_closed_form(
    model: ContractiveAutoencoder, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    (linear,) = model.encoder_linears
    act = model.config.activation
    if torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad):
        # the activation's forward, not the module call: no hooks to run
        act_fn = model.encoder_act.forward
        code, penalty = _OneLayerCode.apply(x, linear.weight, linear.bias, act, act_fn)
        return penalty, code
    pre = linear(x)
    code = model.encoder_act(pre)
    d = activation_derivative(act, pre, code)
    return torch.dot(d.square().mean(dim=0), linear.weight.square().sum(dim=1)), code


def closed_form_penalty(
    model: ContractiveAutoencoder, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over rows of ‖J‖²_F, code) computed analytically; exact for any depth."""
    linears = model.encoder_linears
    if len(linears) == 1:
        return _one_layer_closed_form(model, x)
    code, pre = model.encode_with_preactivations(x)
    act = model.config.activation
    outs = [model.encoder_act(a) for a in pre[:-1]] + [code]
    jac = None  # per-row Jacobian of the layers so far: [B, width, D]
    for linear, a, h in zip(linears, pre, outs, strict=True):
        d = activation_derivative(act, a, h)
        w = linear.weight
        local = w if jac is None else torch.matmul(w, jac)  # [width, D] or [B, width, D]
        jac = d.unsqueeze(-1) * local
    return jac.square().sum(dim=(1, 2)).mean(), code


def exact_penalty(encode, x: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ‖J‖²_F from the full Jacobian (torch.func.jacrev)."""
    jac = vmap(jacrev(encode))(x)  # [B, code, D]
    return jac.square().sum(dim=(1, 2)).mean()


def estimated_penalty(
    encode, x: torch.Tensor, n_projections: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Unbiased Hutchinson estimate of the mean over rows of ‖J‖²_F (forward-mode jvp)."""
    xk = x.repeat(n_projections, 1)
    v = torch.randint(0, 2, xk.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    _, jv = jvp(encode, (xk,), (v,))
    return jv.square().sum(dim=1).mean()


def projected_penalty(
    model: ContractiveAutoencoder,
    x: torch.Tensor,
    n_projections: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unbiased estimate of the mean over rows of ‖J‖²_F, code), forward-mode by hand.

    Draws the same Rademacher v as `estimated_penalty` for the same generator state,
    and computes the same J v: t ← φ'(a_l) ⊙ (t W_lᵀ) layer by layer from t = v.
    One encoder forward serves every projection and the reconstruction.
    """
    code, pre = model.encode_with_preactivations(x)
    act = model.config.activation
    outs = [model.encoder_act(a) for a in pre[:-1]] + [code]
    shape = (n_projections, *x.shape)
    t = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    for linear, a, h in zip(model.encoder_linears, pre, outs, strict=True):
        t = activation_derivative(act, a, h) * (t @ linear.weight.T)
    return t.square().sum(dim=-1).mean(), code


def contractive_penalty(
    model: ContractiveAutoencoder,
    x: torch.Tensor,
    mode: PenaltyMode = "closed",
    n_projections: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if mode == "closed":
        return closed_form_penalty(model, x)[0]
    if mode == "exact":
        return exact_penalty(model.encode, x)
    if mode == "estimate":
        return projected_penalty(model, x, n_projections, generator)[0]
    raise ValueError(f"unknown penalty mode {mode!r}")


def cae_loss(
    model: ContractiveAutoencoder,
    x: torch.Tensor,
    penalty_weight: float,
    mode: PenaltyMode = "closed",
    n_projections: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, penalty). In closed and estimate modes the encoder runs once."""
    if penalty_weight == 0:
        recon = (model(x) - x).square().mean()
        return recon, recon, torch.zeros((), device=x.device)
    if mode in ("closed", "estimate"):
        if mode == "closed":
            penalty, code = closed_form_penalty(model, x)
        else:
            penalty, code = projected_penalty(model, x, n_projections, generator)
        recon = (model.decode(code) - x).square().mean()
    else:
        recon = (model(x) - x).square().mean()
        penalty = contractive_penalty(model, x, mode, n_projections, generator)
    return torch.add(recon, penalty, alpha=penalty_weight), recon, penalty
