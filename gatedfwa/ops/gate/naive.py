"""The gate's float64 oracle, for tests: each registered gate's formula written down
(GateSpec.naive, in gatedfwa/ops/gate/kinds/) and differentiated by autograd, from the gate's
inputs or from the gate projection.

Everything runs in the inputs' dtype: in float64 it is the reference the tests compare every
path with, in a lower precision it shows the error that precision causes by itself (the rule
of docs/correctness.md). Production code never calls it.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.gate.registry import DEFAULT_GATE, gate_spec

__all__ = ["naive_log_gates", "naive_log_gates_from_projection"]


def naive_log_gates(*inputs: torch.Tensor, gate: str = DEFAULT_GATE) -> torch.Tensor:
    """g [same shape as the inputs] = the formula of the gate named ``gate`` on its inputs
    (a, or a and beta_pre for the default gate; [B, T, H] or any equal shapes), in their
    dtype, differentiable by autograd."""
    return gate_spec(gate).naive(*inputs)


def naive_log_gates_from_projection(gate_pre: torch.Tensor, gate_bias: torch.Tensor | None,
                                    gate: str = DEFAULT_GATE) -> torch.Tensor:
    """g [B, T, H] from the gate projection gate_pre [B, T, n H] (the gate's n inputs per head
    in column blocks of H, a's first) and the bias [H] added to a (or None), in gate_pre's
    dtype: what log_gates_from_projection computes."""
    spec = gate_spec(gate)
    inputs = list(gate_pre.split(gate_pre.shape[-1] // spec.inputs_per_head, dim=-1))
    if gate_bias is not None:
        inputs[0] = inputs[0] + gate_bias.to(inputs[0].dtype)
    return spec.naive(*inputs)
