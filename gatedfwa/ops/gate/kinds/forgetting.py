"""The forgetting gate: g = logsigmoid(a), one input per head.

    a = x W_g + b_g          [B, T, HQ]
    g = logsigmoid(a)        (<= 0; the per-step retention exp(g) is sigmoid(a))

With the "forgetting" attention kind (no window; gatedfwa/attention_kinds.py) this is
forgetting attention with its original gate. The gate projection is [B, T, HQ] and a layer's
decay_gate_proj.weight [HQ, C]; decay_gate_bias starts at the logits of the retentions in
GatedFWAConfig.gate_init_range, as for the default gate.

Stable forms, with e = exp(-|a|) in (0, 1]:

    g     = min(a, 0) - log1p(e)
    dg/da = sigmoid(-a) = e / (1 + e) if a >= 0,  1 / (1 + e) = 1 - e / (1 + e) otherwise

Both are finite for every finite a: g lies in [min(a, 0) - log 2, 0] and dg/da in (0, 1), so
no input range needs care beyond exp and log1p themselves (device_math.py, which keep about
one ulp for any argument). This module is the whole gate; docs/gate.md ("Adding a gate")
walks through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatedfwa.ops.gate.device_math import exp_nonpositive, log1p_unit
from gatedfwa.ops.gate.spec import GateSpec
# Triton is optional: without it the device functions are defined but never compiled.
from gatedfwa.ops.common.triton_support import jit, tl

__all__ = ["GATE", "naive_forgetting_log_gates", "forgetting_log_gate", "forgetting_log_gate_derivative"]


def naive_forgetting_log_gates(a: torch.Tensor) -> torch.Tensor:
    """g = logsigmoid(a) [same shape as a], in a's dtype, differentiable by autograd (the
    float64 reference of the tests; PyTorch's logsigmoid is already the stable form)."""
    return F.logsigmoid(a)


def forgetting_log_gates_torch(a: torch.Tensor) -> torch.Tensor:
    """The PyTorch path: a [any shape] float32/float64 -> g in a's dtype. Its autograd backward,
    sigmoid(-a), is stable too, so the spec gives no analytic backward."""
    return F.logsigmoid(a)


@jit
def forgetting_log_gate(a):
    """g = min(a, 0) - log1p(exp(-|a|)) for a float32 block."""
    return tl.minimum(a, 0.0) - log1p_unit(exp_nonpositive(-tl.abs(a)))


@jit
def forgetting_log_gate_derivative(a):
    """dg/da = sigmoid(-a) for a float32 block, without cancellation for either sign of a."""
    e = exp_nonpositive(-tl.abs(a))
    e_over = e / (1.0 + e)
    return tl.where(a >= 0, e_over, 1.0 - e_over)


GATE = GateSpec(
    name="forgetting",
    description="logsigmoid(a); input a",
    input_names=("a",),
    naive=naive_forgetting_log_gates,
    forward_torch=forgetting_log_gates_torch,
    backward_torch=None,
    device_value=forgetting_log_gate,
    device_derivatives=forgetting_log_gate_derivative,
)
