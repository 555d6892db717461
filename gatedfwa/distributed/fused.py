"""The Triton path of context parallelism: one autograd.Function that drives the kernels and
the halo exchange itself and owns its buffers, so that no full-size tensor is copied
(docs/distributed.md, "The scheme").

On a rank with a halo of h > 0 positions and e = min(w - 1, n) first queries (those whose
window reaches before the shard):

    forward   post the halo exchange of k, v, g
              o, lse  = the op on the whole shard (n queries, n keys), while the halo travels;
                        rows [0, e) lack the halo and are replaced below
              wait; o1, lse1 = the op for q[:, :e] against [halo ‖ first e keys]
              o[:, :e] = o1, lse[:, :, :e] = +inf
    backward  dq1, dkeys, dvalues, dgates = the first rows' backward (small); post the
              halo's part [:, :h] of them to its owners
              dq, dk, dv, dg = the whole shard's backward, while the gradients travel
              dq[:, :e] = dq1; dk[:, :e] += dkeys[:, h:] (dv, dg alike)
              wait; add the returning gradients of the shard's tail in place

Why +inf: the backward kernels weigh every score by P = exp2(s - lse2) (base 2). With
lse2 = +inf on rows [0, e), P = 0 there for every key, the masked ones included
(-inf - inf = -inf): dS = P * (dP - delta) = 0 (delta = rowsum(do * o) is finite), so those
rows add nothing to dk, dv, the gate gradient's row and column sums of dS, or the
chunk-boundary fluxes, and their dq is 0 until dq1 replaces it. The shifted query term
lse2 - P of the dk/dv kernel stays +inf (P finite). The whole-shard backward thus computes
exactly the gradients of rows [e, n), whose windows lie inside the shard.

Rank 0 (no halo) needs only the whole-shard call: its first rows are exact already. When the
window is longer than the shard (e = n) the whole-shard call would be discarded entirely, so
only the first rows' call runs (then with every query of the shard, after the exchange).
"""

from __future__ import annotations

import torch

from gatedfwa.distributed.halo import HaloLink
from gatedfwa.ops.window_attention.triton_path import window_attention_backward as _backward_impl
from gatedfwa.ops.window_attention.triton_path import window_attention_forward as _forward_impl

__all__ = ["fused_context_parallel_attention"]


def _ignore_rows(lse2: torch.Tensor, rows: int) -> None:
    """Make the backward kernels skip query rows [0, rows) of lse2 [B, HQ, T]: P = 0 there."""
    lse2[:, :, :rows] = float("inf")


def _empty_halo(x: torch.Tensor) -> torch.Tensor:
    """[B, 0, ...] like x: the halo gradients of a rank without a halo (it still posts its half
    of the exchange: it receives)."""
    return x.new_empty((x.shape[0], 0, *x.shape[2:]))


class _FusedContextParallelAttention(torch.autograd.Function):
    """o [B, n, HQ, D] of this rank's shard; see the module docstring. Inputs contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, g, window_size: int, scale: float, link: HaloLink):
        plan = link.plan
        n, halo = q.shape[1], plan.halo
        edge = min(plan.halo_want, n)  # the queries whose window reaches before the shard
        first = halo > 0  # rows [0, edge) need their own call against the halo
        whole = not first or edge < n  # the whole-shard call gives some exact rows
        pending = link.start([k, v] if g is None else [k, v, g])
        o = lse = None
        if whole:
            o, lse = _forward_impl(q, k, v, g, window_size, scale, None, None)
        halos = pending.wait()
        q1 = keys = values = gates = o1 = lse1 = None
        if first:
            q1 = q[:, :edge].contiguous()
            keys, values = (torch.cat([h, x[:, :edge]], dim=1) for h, x in zip(halos[:2], (k, v)))
            gates = None if g is None else torch.cat([halos[2], g[:, :edge]], dim=1)
            o1, lse1 = _forward_impl(q1, keys, values, gates, window_size, scale, None, None)
            if whole:
                o[:, :edge] = o1
                _ignore_rows(lse, edge)
            else:
                o = o1
        ctx.save_for_backward(q, k, v, g, o, lse, q1, keys, values, gates, o1, lse1)
        ctx.window_size, ctx.scale, ctx.link = window_size, scale, link
        ctx.edge, ctx.halo, ctx.first, ctx.whole = edge, halo, first, whole
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, o, lse, q1, keys, values, gates, o1, lse1 = ctx.saved_tensors
        edge, halo, window_size, scale = ctx.edge, ctx.halo, ctx.window_size, ctx.scale
        do = do.contiguous()
        exchanged = [k, v] if g is None else [k, v, g]
        if ctx.first:
            # The first rows first: their halo part goes back to its owners while the whole
            # shard's backward runs.
            first_grads = _backward_impl(do[:, :edge].contiguous(), q1, keys, values, gates, o1, lse1,
                                         window_size, scale, None, None)
            dq1, own = first_grads[0], [d for d in first_grads[1:] if d is not None]
            returning = ctx.link.post_gradients([d[:, :halo] for d in own])
        else:
            returning = ctx.link.post_gradients([_empty_halo(x) for x in exchanged])
        if ctx.whole:
            dq, dk, dv, dg = _backward_impl(do, q, k, v, g, o, lse, window_size, scale, None, None)
            grads = [dk, dv] if g is None else [dk, dv, dg]
            if ctx.first:
                dq[:, :edge] = dq1
                for grad, part in zip(grads, own):
                    grad[:, :edge] += part[:, halo:]
        else:  # every query was a first row: the shard's gradients are the keys' after the halo
            dq, grads = dq1, [d[:, halo:] for d in own]
        returning.add_to(grads, 0)
        dk, dv = grads[:2]
        dg = grads[2] if g is not None else None
        return dq, dk, dv, dg, None, None, None


def fused_context_parallel_attention(q, k, v, g, window_size: int, scale: float | None,
                                     link: HaloLink) -> torch.Tensor:
    """Context-parallel window attention through the Triton kernels, the halo exchanged over
    `link` (its plan has an exchange). q [B, n, HQ, D], k, v [B, n, H, D], g [B, n, HQ] or
    None, validated by the caller. Returns o [B, n, HQ, D] in q's dtype."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return _FusedContextParallelAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), None if g is None else g.contiguous(),
        window_size, scale, link)
