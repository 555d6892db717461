"""The PyTorch path of any gate: its GateSpec's forward_torch, with the analytic
backward_torch as the autograd backward (or autograd through forward_torch without one).

Inputs of any floating dtype are computed in float32, or float64 when one of them is float64;
gradients come back in each input's own dtype.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.gate.spec import GateSpec

__all__ = ["torch_log_gates"]


def _compute_dtype(inputs) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32


class _AnalyticGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, *inputs):
        ctx.spec = spec
        ctx.save_for_backward(*inputs)
        compute = _compute_dtype(inputs)
        return spec.forward_torch(*(x.to(compute) for x in inputs))

    @staticmethod
    def backward(ctx, dg):
        inputs = ctx.saved_tensors
        compute = _compute_dtype(inputs)
        grads = ctx.spec.backward_torch(dg.to(compute), *(x.to(compute) for x in inputs))
        return (None, *(d.to(x.dtype) for d, x in zip(grads, inputs)))


def torch_log_gates(spec: GateSpec, *inputs: torch.Tensor) -> torch.Tensor:
    """g = the gate of ``spec`` on ``inputs`` (spec.inputs_per_head tensors of one shape,
    usually [B, T, H]): same shape, float32 (float64 when an input is float64), differentiable."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    if spec.backward_torch is None or not needs_grad:
        # Without a gradient to take, no autograd.Function: torch.compile cannot trace one
        # with a non-tensor argument under no_grad (compiled decoding steps run there).
        compute = _compute_dtype(inputs)
        return spec.forward_torch(*(x.to(compute) for x in inputs))
    return _AnalyticGate.apply(spec, *inputs)
