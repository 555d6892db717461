"""The gate and the attention as one op, from the gate projection to the attention output.

    gate_pre [B, T, n HQ], b_g [HQ] --(chunk sums kernel)--> chunk gate sums [2, B, HQ, T]
    q, k, v + chunk gate sums      --(attention kernels)--> o [B, T, HQ, D], lse

Forward: one pass over gate_pre evaluates g in registers and writes only the chunk-local sums
the attention tiles read (chunk_sums.py); g [B, T, HQ] is never stored. Backward: the attention
backward gives dg in its [B, HQ, T] layout and the gate backward kernel (gate/kernels.py) reads it in
place, with gate_pre, to write d(gate_pre) [B, T, n HQ] and d(b_g); the sums saved by the
forward are reused. n is the gate's inputs per head (2 for the default gate, a and beta_pre;
1 for "forgetting"): every function takes ``gate``, a name in gatedfwa/ops/gate/registry.py,
and the kernels evaluate that gate's device functions. The forward and backward are a KernelOp
(gatedfwa/ops/common/custom_op.py): torch.compile sees two custom ops with a registered
backward, eager calls an autograd.Function with the same forward and backward.

gated_fwa_attention, the public face, runs this on the Triton backend and the composition of
the two pieces (log_gates_from_projection, then gated_window_attention) elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.common.custom_op import KernelOp, no_gradient
from gatedfwa.ops.common.triton_support import LN2
from gatedfwa.ops.common.validation import check_attention_args, check_float_tensor, format_shape
from gatedfwa.ops.gate.op import check_gate_bias, log_gates_from_projection
from gatedfwa.ops.gate.registry import DEFAULT_GATE, gate_spec
from gatedfwa.ops.window_attention.op import gated_window_attention
from gatedfwa.ops.window_attention.triton_path import natural_lse_gradient

__all__ = ["gate_attention_from_projection", "gated_fwa_attention"]


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_pre: torch.Tensor,
    gate_bias: torch.Tensor | None,
    window_size: int | None,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    lse_differentiable: bool = False,
    gate: str = DEFAULT_GATE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (o, lse2 [B, HQ, T] base 2, sums [2, B, HQ, T] float32) from the Triton kernels;
    lse_differentiable: the caller hands lse2 on, so its gradient reaches the backward; gate:
    the registered gate's name."""
    from gatedfwa.ops.window_attention.chunk_sums import chunk_gate_sums_from_projection
    from gatedfwa.ops.window_attention.forward import attention_forward
    from gatedfwa.ops.window_attention.launch import gate_chunk

    sums = chunk_gate_sums_from_projection(gate_pre, gate_bias, gate_chunk(q.shape[-1], q.device), cu_seqlens, gate=gate)
    o, lse2 = attention_forward(q, k, v, sums, window_size, scale, cu_seqlens)
    return o, lse2, sums


def _forward_fake(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens, lse_differentiable=False,
                  gate=DEFAULT_GATE):
    batch, seqlen, num_q_heads, _ = q.shape
    return (
        torch.empty_like(q),
        q.new_empty((batch, num_q_heads, seqlen), dtype=torch.float32),
        q.new_empty((2, batch, num_q_heads, seqlen), dtype=torch.float32),
    )


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_pre: torch.Tensor,
    gate_bias: torch.Tensor | None,
    sums: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    window_size: int | None,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    dlse2: torch.Tensor | None = None,
    gate: str = DEFAULT_GATE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, d_gate_pre [B, T, n HQ] in gate_pre's dtype, d_bias [HQ] in the
    bias's dtype, or an empty tensor without bias) from the Triton kernels; dlse2: the gradient
    into lse2, or None."""
    from gatedfwa.ops.gate.op import projection_backward
    from gatedfwa.ops.window_attention.backward import attention_backward

    dq, dk, dv, dg = attention_backward(do, q, k, v, sums, o, lse, window_size, scale, cu_seqlens,
                                        dlse=natural_lse_gradient(dlse2))
    d_gate_pre, d_bias = projection_backward(dg, gate_pre, gate_bias, dg_seqlen=gate_pre.shape[1], gate=gate)
    return dq, dk, dv, d_gate_pre, d_bias


def _backward_fake(do, q, k, v, gate_pre, gate_bias, sums, o, lse, window_size, scale, cu_seqlens, dlse2=None,
                   gate=DEFAULT_GATE):
    d_bias = no_gradient(gate_pre) if gate_bias is None else torch.empty_like(gate_bias)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(gate_pre, memory_format=torch.contiguous_format), d_bias)


def _save(ctx, inputs, output):
    q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens, lse_differentiable, gate = inputs
    o, lse, sums = output
    ctx.save_for_backward(q, k, v, gate_pre, gate_bias, sums, o, lse, cu_seqlens)
    ctx.gate = gate
    ctx.window_size = window_size
    ctx.scale = scale
    ctx.has_bias = gate_bias is not None
    ctx.lse_differentiable = lse_differentiable


def _gradients(ctx, backward, do, dlse2, dsums):
    """The inputs' gradients from what _save kept. dlse2 is passed on only when the caller
    returned the lse; the sums are internal (no gradient flows into them)."""
    q, k, v, gate_pre, gate_bias, sums, o, lse, cu_seqlens = ctx.saved_tensors
    if do is None:  # only the lse was used
        do = torch.zeros_like(o)
    dlse2 = dlse2.contiguous() if ctx.lse_differentiable and dlse2 is not None else None
    dq, dk, dv, d_gate_pre, d_bias = backward(
        do.contiguous(), q, k, v, gate_pre, gate_bias, sums, o, lse, ctx.window_size, ctx.scale, cu_seqlens, dlse2,
        ctx.gate,
    )
    return dq, dk, dv, d_gate_pre, (d_bias if ctx.has_bias else None), None, None, None, None, None


def _internal_outputs(inputs, output):
    """The sums always, and lse2 unless the caller hands it on."""
    lse_differentiable = inputs[-2]
    return (output[2],) if lse_differentiable else (output[1], output[2])


_gate_attention = KernelOp(
    "gatedfwa::gate_attention", _forward, _forward_fake, backward=_backward, backward_fake=_backward_fake,
    save=_save, gradients=_gradients, non_differentiable=_internal_outputs,
)


def _fused_gate_attention(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens, lse_differentiable=False,
                          gate=DEFAULT_GATE):
    """Triton path of gated_fwa_attention after the gate projection (arguments checked there).

    q [B, T, HQ, D], k/v [B, T, H, D], gate_pre [B, T, n HQ] (n: the gate's inputs per head),
    gate_bias [HQ] or None. Returns (o [B, T, HQ, D], lse2 [B, HQ, T] float32 in base 2);
    lse2 carries a gradient only with lse_differentiable."""
    o, lse2, _ = _gate_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), gate_pre.contiguous(),
        None if gate_bias is None else gate_bias.contiguous(), window_size, scale, cu_seqlens, lse_differentiable,
        gate,
    )
    return o, lse2


def check_gated_fwa_args(q, k, v, x, gate_weight, gate_bias, window_size, scale, cu_seqlens,
                         gate: str = DEFAULT_GATE) -> None:
    spec = gate_spec(gate)
    check_attention_args(q, k, v, None, window_size, scale, cu_seqlens)
    num_q_heads = q.shape[2]
    width = spec.inputs_per_head
    check_float_tensor("x", x, 3, "[batch, seqlen, model_dim]")
    if x.shape[:2] != q.shape[:2]:
        raise ValueError(f"x and q must agree in batch and seqlen, got x {format_shape(x)} and q {format_shape(q)}")
    if x.device != q.device:
        raise ValueError(f"x must be on q's device {q.device}, got {x.device}")
    check_float_tensor("gate_weight", gate_weight, 2, f"[{width} * query_heads, model_dim]")
    expected = (width * num_q_heads, x.shape[-1])
    if tuple(gate_weight.shape) != expected:
        raise ValueError(
            f"gate_weight must have shape [{width} * query_heads, model_dim] = {list(expected)} "
            f"(the {spec.name!r} gate's rows: {spec.projection_layout('HQ').replace('columns', 'rows')}), "
            f"got {format_shape(gate_weight)}"
        )
    if gate_weight.dtype != x.dtype:
        raise TypeError(f"gate_weight must have x's dtype {x.dtype}, got {gate_weight.dtype}")
    if gate_weight.device != x.device:
        raise ValueError(f"gate_weight must be on x's device {x.device}, got {gate_weight.device}")
    check_gate_bias(gate_bias, num_q_heads, x.device)


def gated_fwa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    window_size: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    gate: str = DEFAULT_GATE,
):
    """GatedFWA from projections to output: the gate from x, then gated window attention.

        gate_pre = x @ gate_weight^T                                  [B, T, n HQ]
        g        = log_gates_from_projection(gate_pre, gate_bias, gate)     [B, T, HQ] float32
        o        = gated_window_attention(q, k, v, g, window_size, scale, cu_seqlens)
    (the composition it equals; see below for what runs).

    Args:
        q: [B, T, HQ, D]; k, v: [B, T, H, D] (see gated_window_attention).
        x: [B, T, C] the layer input the gate reads.
        gate_weight: [n * HQ, C] in x's dtype, n the gate's inputs per head; rows 0..HQ-1 are
            W_g, and for the default gate (n = 2) rows HQ..2HQ-1 W_beta.
        gate_bias: [HQ] b_g (added to a; W_beta has no bias), or None.
        window_size, scale, cu_seqlens, return_lse: as in gated_window_attention.
        gate: the name of a gate in gatedfwa.ops.gate.registry.GATES ("sharpened", the
            default: g = logsigmoid(beta a) / beta; "forgetting": g = logsigmoid(a)).

    Returns:
        o [B, T, HQ, D] in q's dtype, or (o, lse [B, HQ, T]) with return_lse. Gradients flow
        to q, k, v, x, gate_weight and gate_bias.

    On the Triton backend the gate and the attention run as one op (this module): one
    pass over gate_pre writes the chunk-local gate sums the attention kernels read, g is never
    stored, and the backward turns the attention's dg into d(gate_pre) in one pass.
    """
    check_gated_fwa_args(q, k, v, x, gate_weight, gate_bias, window_size, scale, cu_seqlens, gate)
    return _attend_from_projection(
        q, k, v, F.linear(x, gate_weight), gate_bias, window_size, scale, cu_seqlens, return_lse, gate
    )


def gate_attention_from_projection(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_pre: torch.Tensor,
    gate_bias: torch.Tensor | None,
    window_size: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    gate: str = DEFAULT_GATE,
):
    """gated_fwa_attention after the gate projection: for callers that compute
    gate_pre = x @ gate_weight^T themselves, e.g. in the same GEMM as q (GatedFWAttention).

    Args:
        q: [B, T, HQ, D]; k, v: [B, T, H, D] (see gated_window_attention).
        gate_pre: [B, T, n HQ] floating point, the gate's n inputs per head in column blocks
            of HQ: columns 0..HQ-1 a = x W_g, then (default gate) x W_beta; a column slice of
            a wider projection is taken as it is (no copy of the rest).
        gate_bias, window_size, scale, cu_seqlens, return_lse, gate: as in gated_fwa_attention.
    Returns: as gated_fwa_attention; gradients flow to q, k, v, gate_pre and gate_bias.
    """
    width = gate_spec(gate).inputs_per_head
    check_attention_args(q, k, v, None, window_size, scale, cu_seqlens)
    check_float_tensor("gate_pre", gate_pre, 3, f"[batch, seqlen, {width} * query_heads]")
    expected = (*q.shape[:2], width * q.shape[2])
    if tuple(gate_pre.shape) != expected:
        raise ValueError(
            f"gate_pre must have shape [batch, seqlen, {width} * query_heads] = {list(expected)} "
            f"for the {gate!r} gate, got {format_shape(gate_pre)}"
        )
    if gate_pre.device != q.device:
        raise ValueError(f"gate_pre must be on q's device {q.device}, got {gate_pre.device}")
    check_gate_bias(gate_bias, q.shape[2], q.device)
    return _attend_from_projection(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens, return_lse, gate)


def _attend_from_projection(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens, return_lse,
                            gate=DEFAULT_GATE):
    """The two ops' shared body, arguments checked: the fused op on the Triton backend, the
    composition elsewhere."""
    if select_backend(q.device) == "triton":
        scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
        o, lse2 = _fused_gate_attention(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens, return_lse,
                                        gate)
        return (o, lse2 * LN2) if return_lse else o
    g = log_gates_from_projection(gate_pre, gate_bias, gate)
    return gated_window_attention(
        q, k, v, g, window_size=window_size, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse
    )
