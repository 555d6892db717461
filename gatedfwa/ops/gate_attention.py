"""The gate and the attention as one op, from the gate projection to the attention output.

    gate_pre [B, T, 2HQ], b_g [HQ] --(gate_sums kernel)--> chunk gate sums [2, B, HQ, T]
    q, k, v + chunk gate sums      --(attention kernels)--> o [B, T, HQ, D], lse

Forward: one pass over gate_pre evaluates g in registers and writes only the chunk-local sums
the attention tiles read (gate_sums.py); g [B, T, HQ] is never stored. Backward: the attention
backward gives dg in its [B, HQ, T] layout and the gate backward kernel (gate.py) reads it in
place, with gate_pre, to write d(gate_pre) [B, T, 2HQ] and d(b_g); the sums saved by the
forward are reused. torch.compile sees two custom ops with a registered backward; eager
calls take an autograd.Function with the same forward and backward, which skips the custom
ops' dispatch on the host.

gated_fwa_attention (gate.py) calls this on the Triton backend; the pieces
(log_gates_from_projection, gated_window_attention) stay usable on their own.
"""

from __future__ import annotations

import torch

__all__ = ["gate_attention"]


def _forward_impl(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens):
    """(o, lse2 [B, HQ, T] base 2, sums [2, B, HQ, T] float32) from the Triton kernels."""
    from gatedfwa.ops.attention import attention_forward, gate_chunk
    from gatedfwa.ops.gate_sums import chunk_gate_sums_from_projection

    sums = chunk_gate_sums_from_projection(gate_pre, gate_bias, gate_chunk(q.shape[-1]), cu_seqlens)
    o, lse2 = attention_forward(q, k, v, sums, window_size, scale, cu_seqlens)
    return o, lse2, sums


def _backward_impl(do, q, k, v, gate_pre, gate_bias, sums, o, lse, window_size, scale, cu_seqlens):
    """(dq, dk, dv, d_gate_pre, d_bias) from the Triton kernels, d_bias empty without bias."""
    from gatedfwa.ops.attention import attention_backward
    from gatedfwa.ops.gate import projection_backward

    dq, dk, dv, dg = attention_backward(do, q, k, v, sums, o, lse, window_size, scale, cu_seqlens)
    d_gate_pre, d_bias = projection_backward(dg, gate_pre, gate_bias, dg_seqlen=gate_pre.shape[1])
    return dq, dk, dv, d_gate_pre, d_bias


@torch.library.custom_op("gatedfwa::gate_attention_forward", mutates_args=(), device_types=None)
def _gate_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_pre: torch.Tensor,
    gate_bias: torch.Tensor | None,
    window_size: int | None,
    scale: float,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (o, lse2 [B, HQ, T] base 2, sums [2, B, HQ, T] float32)."""
    return _forward_impl(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens)


@_gate_attention_forward.register_fake
def _(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens):
    batch, seqlen, num_q_heads, _ = q.shape
    return (
        torch.empty_like(q),
        q.new_empty((batch, num_q_heads, seqlen), dtype=torch.float32),
        q.new_empty((2, batch, num_q_heads, seqlen), dtype=torch.float32),
    )


@torch.library.custom_op("gatedfwa::gate_attention_backward", mutates_args=(), device_types=None)
def _gate_attention_backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, d_gate_pre [B, T, 2HQ] in gate_pre's dtype, d_bias [HQ] in the
    bias's dtype, or an empty tensor without bias)."""
    return _backward_impl(do, q, k, v, gate_pre, gate_bias, sums, o, lse, window_size, scale, cu_seqlens)


@_gate_attention_backward.register_fake
def _(do, q, k, v, gate_pre, gate_bias, sums, o, lse, window_size, scale, cu_seqlens):
    d_bias = gate_pre.new_empty((0,)) if gate_bias is None else torch.empty_like(gate_bias)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(gate_pre, memory_format=torch.contiguous_format), d_bias)


def _setup_context(ctx, inputs, output):
    q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens = inputs
    o, lse, sums = output
    ctx.save_for_backward(q, k, v, gate_pre, gate_bias, sums, o, lse, cu_seqlens)
    ctx.window_size = window_size
    ctx.scale = scale
    ctx.has_bias = gate_bias is not None


def _gradients(ctx, do, backward):
    """The inputs' gradients from what _setup_context saved; `backward` is the backward custom
    op (compiled graphs) or _backward_impl (eager calls)."""
    q, k, v, gate_pre, gate_bias, sums, o, lse, cu_seqlens = ctx.saved_tensors
    # lse and the sums are auxiliary outputs; gradients flowing into them are not supported.
    dq, dk, dv, d_gate_pre, d_bias = backward(
        do.contiguous(), q, k, v, gate_pre, gate_bias, sums, o, lse, ctx.window_size, ctx.scale, cu_seqlens
    )
    return dq, dk, dv, d_gate_pre, (d_bias if ctx.has_bias else None), None, None, None


def _backward(ctx, do, dlse, dsums):
    return _gradients(ctx, do, _gate_attention_backward)


_gate_attention_forward.register_autograd(_backward, setup_context=_setup_context)


class _GateAttention(torch.autograd.Function):
    """The eager path: the custom ops' forward and backward without their dispatch (tens of
    microseconds of host time per call); torch.compile gets the custom ops instead."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])
        return output

    @staticmethod
    def backward(ctx, do, dlse, dsums):
        return _gradients(ctx, do, _backward_impl)


def gate_attention(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens):
    """Triton path of gated_fwa_attention after the gate projection (arguments checked there).

    q [B, T, HQ, D], k/v [B, T, H, D], gate_pre [B, T, 2HQ], gate_bias [HQ] or None.
    Returns (o [B, T, HQ, D], lse2 [B, HQ, T] float32 in base 2)."""
    args = (q.contiguous(), k.contiguous(), v.contiguous(), gate_pre.contiguous(),
            None if gate_bias is None else gate_bias.contiguous(), window_size, scale, cu_seqlens)
    op = _gate_attention_forward if torch.compiler.is_compiling() else _GateAttention.apply
    o, lse2, _ = op(*args)
    return o, lse2
