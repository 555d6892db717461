"""The Triton path of context parallelism: fused_forward and fused_backward drive the kernels
and the halo exchange themselves and own their buffers, so that no full-size tensor is copied
(docs/distributed.md, "The scheme"). Eager calls reach them through one autograd.Function,
compiled ones through one custom op (compiled.py). Packed sequences take the offsets of
packed.ShardOffsets in each kernel call.

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
              dq[:, :e] = dq1
              wait; add dkeys[:, h:] to dk[:, :e] (dv, dg alike) and the returning gradients
              to the shard's tail, in place, each row's parts summed at once
              (partial_sums.add_parts: in float32 for half-precision gradients)

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
from gatedfwa.distributed.packed import ShardOffsets
from gatedfwa.ops.window_attention.triton_path import window_attention_backward as _backward_impl
from gatedfwa.ops.window_attention.triton_path import window_attention_forward as _forward_impl

__all__ = ["fused_context_parallel_attention", "fused_forward", "fused_backward", "SAVED"]

# What fused_forward returns besides o, for fused_backward: the whole-shard call's lse, and
# the first rows' call's queries, keys, values, gates, output and lse (None where a call does
# not run, or without gates).
SAVED = ("lse", "q1", "keys", "values", "gates", "o1", "lse1")


def _ignore_rows(lse2: torch.Tensor, rows: int) -> None:
    """Make the backward kernels skip query rows [0, rows) of lse2 [B, HQ, T]: P = 0 there."""
    lse2[:, :, :rows] = float("inf")


def _empty_halo(x: torch.Tensor) -> torch.Tensor:
    """[B, 0, ...] like x: the halo gradients of a rank without a halo (it still posts its half
    of the exchange: it receives)."""
    return x.new_empty((x.shape[0], 0, *x.shape[2:]))


def _calls(link: HaloLink, n: int) -> tuple[int, int, bool, bool]:
    """(edge, halo, first, whole): the queries whose window reaches before the shard, the
    halo's length, whether the first rows' call runs (a halo exists) and whether the
    whole-shard call does (it gives some exact rows)."""
    plan = link.plan
    edge, halo = min(plan.halo_want, n), plan.halo
    first = halo > 0
    return edge, halo, first, not first or edge < n


def fused_forward(q, k, v, g, window_size: int, scale: float, link: HaloLink, offsets: ShardOffsets):
    """(o, lse, q1, keys, values, gates, o1, lse1): the output [B, n, HQ, D] and what
    fused_backward takes (SAVED). q, k, v, g contiguous; `offsets` of packed sequences
    (ShardOffsets(), all None, without)."""
    n = q.shape[1]
    edge, halo, first, whole = _calls(link, n)
    pending = link.start([k, v] if g is None else [k, v, g])
    o = lse = None
    if whole:
        o, lse = _forward_impl(q, k, v, g, window_size, scale, offsets.whole, None)
    halos = pending.wait()
    q1 = keys = values = gates = o1 = lse1 = None
    if first:
        q1 = q[:, :edge].contiguous()
        keys, values = (torch.cat([h, x[:, :edge]], dim=1) for h, x in zip(halos[:2], (k, v)))
        gates = None if g is None else torch.cat([halos[2], g[:, :edge]], dim=1)
        cu_keys, cu_queries = offsets.first or (None, None)
        o1, lse1 = _forward_impl(q1, keys, values, gates, window_size, scale, cu_keys, cu_queries)
        if whole:
            o[:, :edge] = o1
            _ignore_rows(lse, edge)
        else:
            o = o1
    return o, lse, q1, keys, values, gates, o1, lse1


def fused_backward(do, q, k, v, g, o, saved, window_size: int, scale: float, link: HaloLink, offsets: ShardOffsets):
    """(dq, dk, dv, dg) of this rank's shard (dg None without gates), the halo gradients
    exchanged over `link`. o and saved: fused_forward's outputs (saved: those after o, in the
    order of SAVED)."""
    lse, q1, keys, values, gates, o1, lse1 = saved
    n = q.shape[1]
    edge, halo, first, whole = _calls(link, n)
    do = do.contiguous()
    exchanged = [k, v] if g is None else [k, v, g]
    if first:
        # The first rows first: their halo part goes back to its owners while the whole
        # shard's backward runs.
        cu_keys, cu_queries = offsets.first or (None, None)
        first_grads = _backward_impl(do[:, :edge].contiguous(), q1, keys, values, gates, o1, lse1,
                                     window_size, scale, cu_keys, cu_queries)
        dq1, own = first_grads[0], [d for d in first_grads[1:] if d is not None]
        returning = link.post_gradients([d[:, :halo] for d in own])
    else:
        returning = link.post_gradients([_empty_halo(x) for x in exchanged])
    first_parts = []  # the first rows' part of the first rows' keys, added with the returning ones
    if whole:
        dq, dk, dv, dg = _backward_impl(do, q, k, v, g, o, lse, window_size, scale, offsets.whole, None)
        grads = [dk, dv] if g is None else [dk, dv, dg]
        if first:
            dq[:, :edge] = dq1
            first_parts.append((0, edge, [part[:, halo:] for part in own]))
    else:  # every query was a first row: the shard's gradients are the keys' after the halo
        dq, grads = dq1, [d[:, halo:] for d in own]
    # Every part of a row summed at once (in float32 for half-precision gradients), rounded once.
    returning.add_to(grads, 0, first_parts)
    dk, dv = grads[:2]
    return dq, dk, dv, (grads[2] if g is not None else None)


class _FusedContextParallelAttention(torch.autograd.Function):
    """o [B, n, HQ, D] of this rank's shard; see the module docstring. Inputs contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, g, window_size: int, scale: float, link: HaloLink, offsets: ShardOffsets):
        o, *saved = fused_forward(q, k, v, g, window_size, scale, link, offsets)
        ctx.save_for_backward(q, k, v, g, o, *saved)
        ctx.window_size, ctx.scale, ctx.link, ctx.offsets = window_size, scale, link, offsets
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, o, *saved = ctx.saved_tensors
        dq, dk, dv, dg = fused_backward(do, q, k, v, g, o, saved, ctx.window_size, ctx.scale, ctx.link, ctx.offsets)
        return dq, dk, dv, dg, None, None, None, None


def fused_context_parallel_attention(q, k, v, g, window_size: int, scale: float | None, link: HaloLink,
                                     offsets: ShardOffsets = ShardOffsets()) -> torch.Tensor:
    """Context-parallel window attention through the Triton kernels, the halo exchanged over
    `link` (its plan has an exchange). q [B, n, HQ, D], k, v [B, n, H, D], g [B, n, HQ] or
    None, validated by the caller; `offsets` of packed sequences (B == 1). Returns o
    [B, n, HQ, D] in q's dtype."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return _FusedContextParallelAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), None if g is None else g.contiguous(),
        window_size, scale, link, offsets)
