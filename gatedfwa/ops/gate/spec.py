"""GateSpec: everything gatedfwa needs to know about one gate parameterisation.

A gate turns n inputs per token and query head (n = 1 or 2), read from the layer's gate
projection, into a log gate g <= 0 (the per-step decay the attention takes; docs/gate.md).
The projection's output [B, T, n HQ] holds the inputs one after the other, HQ columns each:
input 0 (always called a) in columns 0..HQ-1, input 1 in HQ..2HQ-1. The gate bias b_g [HQ]
is added to a. Every other piece of gatedfwa reads the gate through a GateSpec: the ops of
op.py (PyTorch path and Triton kernels), the chunk sums of chunk_sums.py, the fused gate +
attention op, the layer (projection width, bias init) and GatedFWAConfig.gate (by name,
through the registry of registry.py). Adding a gate is writing one module with one GateSpec
(docs/gate.md, "Adding a gate"; gatedfwa/ops/gate/kinds/forgetting.py is the example).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from gatedfwa.ops.gate.bias_init import gate_bias_init

__all__ = ["GateSpec", "MAX_GATE_INPUTS"]

# The kernels load and store at most two inputs per head (kernels.py, chunk_sums.py).
MAX_GATE_INPUTS = 2


@dataclass(frozen=True)
class GateSpec:
    """One gate parameterisation: its formula in every form gatedfwa evaluates it.

    Shapes: each input is [B, T, H] (any equal shapes: gates are elementwise), g the same.

    Attributes:
        name: the registry key, e.g. "sharpened"; what GatedFWAConfig.gate and the ops'
            ``gate`` argument name.
        description: one line for listings and error messages.
        input_names: the inputs per head in projection column order, 1 or 2 names; the first
            is a (the bias is added to it). len(input_names) is the projection width per head.
        naive: ``naive(*inputs) -> g``: the formula written down in the inputs' dtype,
            differentiated by autograd. Run in float64 it is the tests' reference; it may
            use stable forms only where the textbook form is a different function in float64
            (not merely less accurate).
        forward_torch: ``forward_torch(*inputs) -> g``: the PyTorch path's value, given inputs
            in float32 (float64 when one of them is float64), returning that dtype; no
            autograd is recorded through it when backward_torch is given.
        backward_torch: ``backward_torch(dg, *inputs) -> (d input for each input)``, all in
            the dtype of forward_torch's inputs; or None, and autograd differentiates
            forward_torch.
        device_value: Triton device function (``@triton.jit``) ``value(*inputs) -> g`` on
            float32 blocks, one argument per input. The kernels receive it as a
            ``tl.constexpr`` argument and inline it.
        device_derivatives: Triton device function ``derivatives(*inputs)`` on float32 blocks:
            dg/d input, a tuple (dg/da, dg/d input1) for two inputs, a single block for one.
            The kernels multiply the upstream dg in afterwards.
        bias_init: ``bias_init(num_heads, retention_range) -> b_g [num_heads] float32``, the
            initial bias from GatedFWAConfig.gate_init_range (default gate_bias_init: the
            logits of the retentions, right for gates with g ~ logsigmoid(a) at small inputs).
    """

    name: str
    description: str
    input_names: tuple[str, ...]
    naive: Callable[..., torch.Tensor]
    forward_torch: Callable[..., torch.Tensor]
    backward_torch: Callable[..., tuple[torch.Tensor, ...]] | None
    device_value: Any
    device_derivatives: Any
    bias_init: Callable[[int, tuple[float, float]], torch.Tensor] = gate_bias_init

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"GateSpec.name must be a non-empty string, got {self.name!r}")
        names = self.input_names
        if not isinstance(names, tuple) or not 1 <= len(names) <= MAX_GATE_INPUTS or not all(
            isinstance(n, str) and n for n in names
        ):
            raise ValueError(
                f"GateSpec.input_names of gate {self.name!r} must be a tuple of 1 to {MAX_GATE_INPUTS} "
                f"names (the kernels read at most {MAX_GATE_INPUTS} inputs per head), got {names!r}"
            )
        for field in ("naive", "forward_torch", "device_value", "device_derivatives", "bias_init"):
            if not callable(getattr(self, field)):
                raise TypeError(f"GateSpec.{field} of gate {self.name!r} must be callable, got {getattr(self, field)!r}")
        if self.backward_torch is not None and not callable(self.backward_torch):
            raise TypeError(f"GateSpec.backward_torch of gate {self.name!r} must be callable or None")

    @property
    def inputs_per_head(self) -> int:
        """n: gate projection columns per query head (the projection is [B, T, n HQ])."""
        return len(self.input_names)

    def projection_layout(self, heads: str = "HQ") -> str:
        """The projection's column layout in words, for docs and error messages:
        "a (HQ columns), then beta_pre (HQ columns)"."""
        return ", then ".join(f"{name} ({heads} columns)" for name in self.input_names)
