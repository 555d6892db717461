"""The sharpened gate, GatedFWA's default (docs/gate.md):

    a      = x W_g + b_g
    beta   = 1 + ELU(x W_beta)                  (> 0)
    g      = logsigmoid(beta * a) / beta        (<= 0)

Two inputs per head, (a, beta_pre = x W_beta): the gate projection is [B, T, 2 HQ], a's
columns then beta_pre's, and a layer's decay_gate_proj.weight is [2 HQ, C]. Its pieces are
the longest of any gate, for the range it must survive (beta from ~1e-22 to ~50, |a| up to
1e4): the PyTorch forms in reference.py, the Triton device functions in device_math.py.
"""

from __future__ import annotations

from gatedfwa.ops.gate.device_math import log_gate, log_gate_derivatives
from gatedfwa.ops.gate.reference import log_gates_backward_torch, log_gates_forward_torch, naive_log_gates
from gatedfwa.ops.gate.spec import GateSpec

__all__ = ["GATE"]

GATE = GateSpec(
    name="sharpened",
    description="logsigmoid(beta a) / beta with beta = 1 + ELU(beta_pre); inputs a, beta_pre",
    input_names=("a", "beta_pre"),
    naive=naive_log_gates,
    forward_torch=log_gates_forward_torch,
    backward_torch=log_gates_backward_torch,
    device_value=log_gate,
    device_derivatives=log_gate_derivatives,
)
