"""The sharpened gate, GatedFWA's default (docs/gate.md):

    a      = x W_g + b_g
    beta   = 1 + ELU(x W_beta)                  (> 0)
    g      = logsigmoid(beta * a) / beta        (<= 0)

Two inputs per head, (a, beta_pre = x W_beta): the gate projection is [B, T, 2 HQ], a's
columns then beta_pre's, and a layer's decay_gate_proj.weight is [2 HQ, C]. Its pieces are
the longest of any gate, for the range it must survive (beta from ~1e-22 to ~50, |a| up to
1e4): the formula and its stable PyTorch forms here, the Triton device functions in
gatedfwa/ops/gate/device_math.py.

* :func:`naive_sharpened_log_gates` writes the formula down and lets autograd differentiate
  it, in the inputs' own dtype. Run in float64 it is the reference of the tests; run in a
  lower precision it shows the error that precision causes by itself (docs/correctness.md).
  Its float32 gradients overflow for beta near 0 (they divide by beta^2).
* :func:`sharpened_log_gates_torch` and :func:`sharpened_log_gates_backward_torch` are the
  PyTorch path (through gatedfwa/ops/gate/torch_path.py) that serves devices without Triton.
  They compute in float32 from the stable forms below, an analytic backward included, so
  values and gradients stay finite over the whole range the gate meets in practice (beta
  from ~1e-22 to ~50, |a| up to 1e4). The Triton kernels compute the same forms.

Stable forms (z = beta * a, e = exp(-|z|) in (0, 1]):

    beta          = 1 + beta_pre           if beta_pre > 0,  exp(beta_pre) otherwise
                    (1 + (exp(x) - 1) rounds to 0 for x < -37 even in float64)
    logsigmoid(z) = min(z, 0) - log1p(e)
    g             = min(a, 0) - log1p(e) / beta                       (z / beta = a exactly)
    dg/da         = sigmoid(-z)          = e / (1 + e) if a >= 0, 1 / (1 + e) otherwise
    dg/dbeta      = (z sigmoid(-z) - logsigmoid(z)) / beta^2 = h(z) / beta^2
    h(z)          = log1p(e) + |z| e / (1 + e)     (h is even in z: both terms >= 0, no
                                                    cancellation for large |z|)
    dg/dbeta_pre  = h(z) / beta^2             if beta_pre > 0    (beta >= 1)
                    h(z) / beta               otherwise          (dbeta/dbeta_pre = beta)

The last line is why the stable path never forms 1/beta^2 for small beta: at
beta_pre = -50, beta ~ 2e-22 and beta^2 ~ 4e-44 is below float32's normal range, while
h / beta ~ 3.6e21 is an ordinary float32. g itself is ~ -log(2) / beta there, also finite;
g reaches float32's -inf only for beta_pre < -88.

Shapes: a and beta_pre [B, T, H] (or any equal shapes: the gate is elementwise), g float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatedfwa.ops.gate.device_math import log_gate, log_gate_derivatives
from gatedfwa.ops.gate.spec import GateSpec

__all__ = [
    "GATE",
    "beta_from_preactivation",
    "naive_sharpened_log_gates",
    "sharpened_log_gates_torch",
    "sharpened_log_gates_backward_torch",
]


def beta_from_preactivation(beta_pre: torch.Tensor) -> torch.Tensor:
    """beta = 1 + ELU(beta_pre), evaluated as exp(beta_pre) for beta_pre <= 0 so that it keeps
    its relative precision when it is tiny. Differentiable; the clamps keep the branch that
    torch.where discards finite, so its (zero-weighted) gradient never turns into NaN."""
    positive = beta_pre > 0
    return torch.where(positive, 1 + beta_pre.clamp(min=0), torch.exp(beta_pre.clamp(max=0)))


def naive_sharpened_log_gates(a: torch.Tensor, beta_pre: torch.Tensor) -> torch.Tensor:
    """g = logsigmoid(beta * a) / beta, computed in the inputs' dtype, differentiated by autograd.

    The float64 reference of the tests (and, in float32/bf16, the "same formula in the same
    precision" of the rule in docs/correctness.md). Only beta is taken in its stable form: the textbook
    1 + ELU(x) is exactly 0 for x < -37 in float64, which is a different function, not a
    rounding error.
    """
    dtype = torch.promote_types(a.dtype, beta_pre.dtype)
    a, beta_pre = a.to(dtype), beta_pre.to(dtype)
    beta = beta_from_preactivation(beta_pre)
    return F.logsigmoid(beta * a) / beta


def _log1p_exp_neg(z_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, log1p(e)) with e = exp(-z_abs), z_abs >= 0."""
    e = torch.exp(-z_abs)
    return e, torch.log1p(e)


def sharpened_log_gates_torch(a: torch.Tensor, beta_pre: torch.Tensor) -> torch.Tensor:
    """g [same shape] float32 from the stable forms (float64 in, float64 out). No autograd."""
    compute = torch.float64 if torch.float64 in (a.dtype, beta_pre.dtype) else torch.float32
    a, beta_pre = a.to(compute), beta_pre.to(compute)
    beta = beta_from_preactivation(beta_pre)
    _, log1p_e = _log1p_exp_neg(beta * a.abs())
    return a.clamp(max=0) - log1p_e / beta


def sharpened_log_gates_backward_torch(
    dg: torch.Tensor, a: torch.Tensor, beta_pre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d a, d beta_pre) in float32 (float64 for float64 inputs) from the upstream dg."""
    compute = torch.float64 if torch.float64 in (a.dtype, beta_pre.dtype) else torch.float32
    a, beta_pre, dg = a.to(compute), beta_pre.to(compute), dg.to(compute)
    positive = beta_pre > 0
    beta = beta_from_preactivation(beta_pre)
    z_abs = beta * a.abs()
    e, log1p_e = _log1p_exp_neg(z_abs)
    sigmoid_neg_z = torch.where(a >= 0, e, torch.ones_like(e)) / (1 + e)
    h = log1p_e + z_abs * (e / (1 + e))
    inv_beta = 1 / beta
    dbeta_pre = dg * h * inv_beta * torch.where(positive, inv_beta, torch.ones_like(inv_beta))
    return dg * sigmoid_neg_z, dbeta_pre


GATE = GateSpec(
    name="sharpened",
    description="logsigmoid(beta a) / beta with beta = 1 + ELU(beta_pre); inputs a, beta_pre",
    input_names=("a", "beta_pre"),
    naive=naive_sharpened_log_gates,
    forward_torch=sharpened_log_gates_torch,
    backward_torch=sharpened_log_gates_backward_torch,
    device_value=log_gate,
    device_derivatives=log_gate_derivatives,
)
