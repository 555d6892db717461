"""The public window attention op: validation, backend dispatch (gatedfwa/ops/backend.py),
and on the Triton backend the kernels (triton_path.py) as a KernelOp (common/custom_op.py):
custom ops with a registered backward, which torch.compile sees, and an autograd.Function
with the same forward and backward for eager calls. Other devices run the chunked PyTorch
path of torch_path.py.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.common.custom_op import KernelOp, no_gradient
from gatedfwa.ops.common.triton_support import LN2
from gatedfwa.ops.common.validation import check_attention_args
from gatedfwa.ops.window_attention.torch_path import chunked_gated_window_attention
from gatedfwa.ops.window_attention.triton_path import window_attention_backward, window_attention_forward

__all__ = ["gated_window_attention", "flash_gated_window_attention"]


# --------------------------------------------------------------------------------------
# The Triton path as a KernelOp
# --------------------------------------------------------------------------------------


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    window_size: int | None,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None = None,
    lse_differentiable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o, lse2): the output and the base-2 log-sum-exp [B, HQ, T_q] float32.
    cu_seqlens delimits k's sequences; cu_seqlens_q q's, None when they are k's.
    lse_differentiable: the caller hands lse2 on, so its gradient reaches the backward."""
    return window_attention_forward(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q)


def _forward_fake(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q=None, lse_differentiable=False):
    batch, seqlen, num_q_heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, num_q_heads, seqlen), dtype=torch.float32)


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    window_size: int | None,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None = None,
    dlse2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """lse is the forward's base-2 log-sum-exp, dlse2 the gradient into it (or None).
    Returns (dq, dk, dv, dg); dg is an empty tensor when g is None."""
    dq, dk, dv, dg = window_attention_backward(do, q, k, v, g, o, lse, window_size, scale, cu_seqlens,
                                               cu_seqlens_q, dlse2)
    return dq, dk, dv, (no_gradient(q) if dg is None else dg)


def _backward_fake(do, q, k, v, g, o, lse, window_size, scale, cu_seqlens, cu_seqlens_q=None, dlse2=None):
    dg = no_gradient(q) if g is None else torch.empty_like(g)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg


def _save(ctx, inputs, output):
    q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q, lse_differentiable = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, g, o, lse, cu_seqlens, cu_seqlens_q)
    ctx.window_size = window_size
    ctx.scale = scale
    ctx.has_gate = g is not None
    ctx.lse_differentiable = lse_differentiable


def _gradients(ctx, backward, do, dlse2):
    """The inputs' gradients from what _save kept. dlse2, the gradient into lse2, is passed on
    only when the caller returned the lse: otherwise it is zero (or None)."""
    q, k, v, g, o, lse, cu_seqlens, cu_seqlens_q = ctx.saved_tensors
    if do is None:  # only the lse was used
        do = torch.zeros_like(o)
    dlse2 = dlse2.contiguous() if ctx.lse_differentiable and dlse2 is not None else None
    dq, dk, dv, dg = backward(do.contiguous(), q, k, v, g, o, lse, ctx.window_size, ctx.scale, cu_seqlens,
                              cu_seqlens_q, dlse2)
    return dq, dk, dv, (dg if ctx.has_gate else None), None, None, None, None, None


def _lse_unless_differentiable(inputs, output):
    return () if inputs[-1] else (output[1],)


_window_attention = KernelOp(
    "gatedfwa::window_attention", _forward, _forward_fake, backward=_backward, backward_fake=_backward_fake,
    save=_save, gradients=_gradients, non_differentiable=_lse_unless_differentiable,
)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def gated_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    window_size: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
):
    """Gated sliding-window attention (GatedFWA).

    o_t = sum_{t - w < j <= t} softmax_j(scale * q_t . k_j + g_{j+1} + ... + g_t) v_j

    q may hold fewer positions than k (T_q <= T_k; chunked prefill, context parallelism):
    the queries align to the end, query i sitting at key position T_k - T_q + i (per sequence
    with varlen), and t above is that key position.

    Args:
        q: [B, T_q, HQ, D] float16, bfloat16 or float32; D <= 256, any value (not only powers
            of 2); T_q <= T_k.
        k, v: [B, T_k, H, D] with HQ % H == 0 (GQA/MQA: key/value heads are shared, never copied).
        g: [B, T_k, HQ] per-step log gates, finite and <= 0 (checked on CPU tensors, on CUDA only
            with GATEDFWA_CHECK_VALUES=1), any float dtype, or None for plain SWA. g covers the
            key positions: the decay between key j and query t sums the gates of key positions
            j+1..t, so with T_q < T_k the gates of the keys before the first query count too.
        window_size: keys visible to a query, the query included (1 = itself only);
            None = full causal (with g: "forgetting" attention).
        scale: logit scale, default D ** -0.5.
        cu_seqlens: int32 (or int64) [N + 1] offsets of N sequences packed along T (B must be 1),
            the same for q and k; nothing, the gate sums included, crosses a sequence boundary.
        return_lse: also return the log-sum-exp of each row's logits, [B, HQ, T_q] float32
            (natural log); gradients flow through it as through o.
        cu_seqlens_q, cu_seqlens_k: keyword only, instead of cu_seqlens when q's sequences are
            shorter than k's: [N + 1] offsets of the same N sequences in q and in k (and g);
            sequence i has cu_seqlens_q[i+1] - cu_seqlens_q[i] <= cu_seqlens_k[i+1] - cu_seqlens_k[i]
            queries (0 allowed), aligned to its last keys.

    Returns:
        o [B, T_q, HQ, D] in q's dtype, or (o, lse) when return_lse.
    """
    if cu_seqlens is not None and (cu_seqlens_q is not None or cu_seqlens_k is not None):
        raise ValueError("give either cu_seqlens (for both q and k) or cu_seqlens_q and cu_seqlens_k, not both")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k go together: give both, or cu_seqlens for both sides")
    if cu_seqlens_k is not None:
        cu_seqlens = cu_seqlens_k  # keys, values and gates; q's own offsets travel separately
        if cu_seqlens_q is cu_seqlens_k:
            cu_seqlens_q = None
    check_attention_args(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q, allow_shorter_queries=True)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if select_backend(q.device) == "triton":
        o, lse2 = _window_attention(
            q.contiguous(), k.contiguous(), v.contiguous(),
            None if g is None else g.contiguous(), window_size, scale, cu_seqlens, cu_seqlens_q, return_lse,
        )
        lse = lse2 * LN2
    else:
        o, lse = chunked_gated_window_attention(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q=cu_seqlens_q)
    return (o, lse) if return_lse else o


def flash_gated_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, 0),
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """flash-attn style alias of :func:`gated_window_attention` for migrating code.

    ``window_size=(left, 0)``: each query sees ``left`` earlier keys plus itself
    (our w = left + 1); left = -1 means unbounded. Attention is always causal, so the
    right window must be 0.
    """
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, 0), got {window_size!r}")
    left, right = window_size
    if right != 0:
        raise ValueError(f"window_size right must be 0 (attention is causal), got {right}")
    if left < -1:
        raise ValueError(f"window_size left must be >= 0, or -1 for unbounded, got {left}")
    return gated_window_attention(
        q, k, v, g,
        window_size=None if left == -1 else left + 1,
        scale=softmax_scale,
        cu_seqlens=cu_seqlens,
        return_lse=return_lse,
    )
