"""The Triton path of context parallelism: fused_forward and fused_backward drive the kernels
and the halo exchange themselves and own their buffers, so that no full-size tensor is copied
(docs/distributed.md, "The scheme"). Both are one KernelOp (gatedfwa/ops/common/custom_op.py):
a custom op with its backward under torch.compile, an autograd.Function in eager calls.
Packed sequences take the offsets of packed.ShardOffsets in each kernel call.

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
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from gatedfwa.distributed.halo import HaloLink, HaloPlan, empty_along_time
from gatedfwa.distributed.ordered import mark_ordered
from gatedfwa.distributed.packed import ShardOffsets, whole_offsets
from gatedfwa.ops.common.custom_op import KernelOp, no_gradient
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


def _calls_of(plan: HaloPlan, n: int) -> tuple[int, int, bool, bool]:
    """(edge, halo, first, whole): the queries whose window reaches before the shard, the
    halo's length, whether the first rows' call runs (a halo exists) and whether the
    whole-shard call does (it gives some exact rows)."""
    edge, halo = min(plan.halo_want, n), plan.halo
    first = halo > 0
    return edge, halo, first, not first or edge < n


def fused_forward(q, k, v, g, window_size: int, scale: float, link: HaloLink, offsets: ShardOffsets):
    """(o, lse, q1, keys, values, gates, o1, lse1): the output [B, n, HQ, D] and what
    fused_backward takes (SAVED). q, k, v, g contiguous; `offsets` of packed sequences
    (ShardOffsets(), all None, without)."""
    n = q.shape[1]
    edge, halo, first, whole = _calls_of(link.plan, n)
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
    edge, halo, first, whole = _calls_of(link.plan, n)
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
        # A rank without a halo still posts its half of the exchange (it receives).
        returning = link.post_gradients([empty_along_time(x, 0) for x in exchanged])
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


# --------------------------------------------------------------------------------------
# The fused path as one KernelOp (gatedfwa/ops/common/custom_op.py): a custom op with its
# backward for torch.compile, an autograd.Function for eager calls. A process group cannot
# cross a custom op, so the op takes the group's name and rebuilds the halo link (and the
# packed offsets) in its forward and backward.
# --------------------------------------------------------------------------------------

# The op's outputs: o, then SAVED (an absent one as an empty tensor: custom ops return tensors).
_Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                 torch.Tensor]
_Gradients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _plan(q: torch.Tensor, group_name: str, window_size: int) -> tuple[HaloPlan, dist.ProcessGroup]:
    group = _resolve_process_group(group_name)
    return HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), q.shape[1], window_size - 1), group


def _link_and_offsets(q, group_name, window_size, cu_seqlens) -> tuple[HaloLink, ShardOffsets]:
    plan, group = _plan(q, group_name, window_size)
    offsets = None if cu_seqlens is None else whole_offsets(cu_seqlens, q, plan.world)
    return HaloLink(plan, group), ShardOffsets.build(offsets, plan, q.device)


def _none_to_empty(tensors, like: torch.Tensor) -> list[torch.Tensor]:
    return [no_gradient(like) if t is None else t for t in tensors]


def _empty_to_none(tensors) -> list[torch.Tensor | None]:
    return [None if t.numel() == 0 and t.dim() == 1 else t for t in tensors]


def _unaliased(outputs: list[torch.Tensor], inputs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Custom ops may not return views of their inputs, nor one tensor twice: copy any output
    that shares the storage of an input or of an earlier output (the first rows' queries when
    they are all of q; the first rows' output when it is the whole output)."""
    seen = {x.untyped_storage().data_ptr() for x in inputs if x is not None and x.numel()}
    unaliased = []
    for t in outputs:
        if t.numel():
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        unaliased.append(t)
    return unaliased


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None, window_size: int, scale: float, group_name: str) -> _Outputs:
    """(o, *SAVED) of fused_forward, absent ones empty."""
    link, offsets = _link_and_offsets(q, group_name, window_size, cu_seqlens)
    outputs = fused_forward(q, k, v, g, window_size, scale, link, offsets)
    return tuple(_unaliased(_none_to_empty(outputs, q), [q, k, v, g]))


def _attention_fake(q, k, v, g, cu_seqlens, window_size, scale, group_name):
    plan, _ = _plan(q, group_name, window_size)
    batch, n, heads, _ = q.shape
    edge, halo, first, whole = _calls_of(plan, n)
    empty = q.new_empty((0,))
    lse = q.new_empty((batch, heads, n), dtype=torch.float32) if whole else empty
    if not first:
        return (torch.empty_like(q), lse, *(empty for _ in SAVED[1:]))
    keys = empty_along_time(k, halo + edge)
    gates = empty if g is None else empty_along_time(g, halo + edge)
    return (torch.empty_like(q), lse, empty_along_time(q, edge), keys, torch.empty_like(keys), gates,
            empty_along_time(q, edge), q.new_empty((batch, heads, edge), dtype=torch.float32))


def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                        cu_seqlens: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor, q1: torch.Tensor,
                        keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor, o1: torch.Tensor,
                        lse1: torch.Tensor, window_size: int, scale: float, group_name: str) -> _Gradients:
    """(dq, dk, dv, dg), dg empty without gates."""
    link, offsets = _link_and_offsets(q, group_name, window_size, cu_seqlens)
    saved = _empty_to_none([lse, q1, keys, values, gates, o1, lse1])
    dq, dk, dv, dg = fused_backward(do, q, k, v, g, o, saved, window_size, scale, link, offsets)
    return dq, dk, dv, q.new_empty((0,)) if dg is None else dg


def _attention_backward_fake(do, q, k, v, g, cu_seqlens, o, lse, q1, keys, values, gates, o1, lse1, window_size,
                             scale, group_name):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((0,)) if g is None else torch.empty_like(g))


def _attention_save(ctx, inputs, output):
    q, k, v, g, cu_seqlens, window_size, scale, group_name = inputs
    ctx.save_for_backward(q, k, v, g, cu_seqlens, *output)
    ctx.window_size, ctx.scale, ctx.group_name, ctx.has_gate = window_size, scale, group_name, g is not None


def _attention_gradients(ctx, backward, do, *unused):
    q, k, v, g, cu_seqlens, o, *saved = ctx.saved_tensors
    dq, dk, dv, dg = backward(do, q, k, v, g, cu_seqlens, o, *saved, ctx.window_size, ctx.scale, ctx.group_name)
    return dq, dk, dv, (dg if ctx.has_gate else None), None, None, None, None


_fused_attention = KernelOp(
    "gatedfwa::context_parallel_attention", _attention, _attention_fake,
    backward=_attention_backward, backward_fake=_attention_backward_fake,
    save=_attention_save, gradients=_attention_gradients,
    non_differentiable=lambda inputs, output: output[1:])
# Both exchange messages: every rank must post them in the same order under torch.compile.
mark_ordered(_fused_attention.op)
mark_ordered(_fused_attention.backward_op)


def fused_context_parallel_attention(q, k, v, g, window_size: int, scale: float | None, group: dist.ProcessGroup,
                                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Context-parallel window attention through the Triton kernels, the halo exchanged over
    `group`, eager or under torch.compile. q [B, n, HQ, D], k, v [B, n, H, D], g [B, n, HQ] or
    None, validated by the caller; cu_seqlens of the whole packed sequence (B == 1) or None.
    Returns o [B, n, HQ, D] in q's dtype."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    contiguous = [None if x is None else x.contiguous() for x in (q, k, v, g)]
    return _fused_attention(*contiguous, cu_seqlens, window_size, scale, group.group_name)[0]
