"""Context parallelism under torch.compile: the communication as torch.library custom ops,
which the compiler keeps as opaque nodes of a known shape (docs/distributed.md, "Under
torch.compile").

torch.compile cannot trace point-to-point messages (batch_isend_irecv) or keep an exchange in
flight across the graph, so a compiled model step reaches them through these ops; a process
group is named by its group_name (a string, as custom ops take no group object):

    gatedfwa::context_parallel_attention (+ _backward)
                                the whole window op on the Triton backend: the fused path's
                                forward and backward (fused.py), its exchange overlapped with
                                the kernels inside the op as in eager mode
    gatedfwa::context_parallel_halo (+ _backward)
                                the halo of k, v, g (or of the token shift's one position):
                                forward, this shard's tail to later ranks; backward, the
                                halo's gradients back to their owners. The PyTorch path's
                                composition is traced around it (no overlap: the exchange
                                waits inside the op)
    gatedfwa::context_parallel_next_first_labels
                                the loss's label of a shard's last token
    gatedfwa::context_parallel_sum
                                the loss's token count over the group

Every rank must post its messages in the same order, though each compiles a graph of its own
shapes: the forward ops are ordered effects (_communicates), and each backward exchange
returns at least one position's gradient (_carried), so that the layer's gradient depends on
it and the data orders the backward's exchanges alike on every rank. Packed
sequences (cu_seqlens) compile on the Triton backend (the offsets are read inside the op); on
the PyTorch path they are refused under torch.compile, since the composition would have to
read them on the host while tracing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from gatedfwa.distributed.fused import SAVED, fused_backward, fused_forward
from gatedfwa.distributed.halo import HaloLink, HaloPlan, exchange_halo_now, return_halo_gradients_now
from gatedfwa.distributed.packed import ShardOffsets, whole_offsets

__all__ = ["compiled_halo", "compiled_next_first_labels", "compiled_group_sum", "compiled_fused_attention"]

IGNORE_INDEX = -100


def _communicates(op) -> None:
    """Mark a custom op as effectful (ordered): in the forward graph the compiler then neither
    drops it when its output looks unused (an empty halo still sends) nor moves it past
    another such op, so that every rank posts its messages in program order, whatever its own
    graph's shapes. (The backward graph carries no such order: see _carried.)"""
    try:
        from torch._library.effects import EffectType
    except ImportError:  # older PyTorch
        from torch._higher_order_ops.effects import _EffectType as EffectType
    if hasattr(op, "register_effect"):
        op.register_effect(EffectType.ORDERED)
    else:
        from torch._higher_order_ops.effects import _register_effectful_op

        _register_effectful_op(op._qualname, EffectType.ORDERED)


def _plan(group_name: str, shard: int, halo_want: int) -> tuple[HaloPlan, dist.ProcessGroup]:
    group = _resolve_process_group(group_name)
    return HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), shard, halo_want), group


def _along_time_like(x: torch.Tensor, length: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], length, *x.shape[2:]))


# --------------------------------------------------------------------------------------
# The halo
# --------------------------------------------------------------------------------------


def _carried(plan: HaloPlan) -> int:
    """The positions of this shard that the halo op takes (and its backward returns the
    gradient of): the tail, and at least one. Where no later rank reads the shard (its last
    rank) that one position's gradient is zero, but it keeps the compiled backward's
    gradient flow dependent on the op: an empty output would not, and the compiler could
    then move the op's messages past those of other layers' exchanges on this rank only."""
    return max(plan.tail, 1)


@torch.library.custom_op("gatedfwa::context_parallel_halo", mutates_args=(), device_types=None)
def _halo(tails: list[torch.Tensor], group_name: str, shard: int, halo_want: int) -> list[torch.Tensor]:
    """The halos [B, h, ...] received for tails [B, c, ...], this shard's last c = _carried
    positions (halo.HaloPlan: h = min(halo_want, rank * shard))."""
    plan, group = _plan(group_name, shard, halo_want)
    return exchange_halo_now(plan, group, [t.contiguous() for t in tails], shard - _carried(plan))


@_halo.register_fake
def _(tails, group_name, shard, halo_want):
    plan, _ = _plan(group_name, shard, halo_want)
    return [_along_time_like(t, plan.halo) for t in tails]


@torch.library.custom_op("gatedfwa::context_parallel_halo_backward", mutates_args=(), device_types=None)
def _halo_backward(halo_grads: list[torch.Tensor], group_name: str, shard: int, halo_want: int) -> list[torch.Tensor]:
    """The tails' gradients [B, c, ...] (c = _carried): the halo's gradients go back to their
    owners."""
    plan, group = _plan(group_name, shard, halo_want)
    return return_halo_gradients_now(plan, group, [d.contiguous() for d in halo_grads], shard - _carried(plan))


@_halo_backward.register_fake
def _(halo_grads, group_name, shard, halo_want):
    plan, _ = _plan(group_name, shard, halo_want)
    return [_along_time_like(d, _carried(plan)) for d in halo_grads]


def _halo_setup(ctx, inputs, output):
    _, ctx.group_name, ctx.shard, ctx.halo_want = inputs


def _halo_gradients(ctx, halo_grads):
    return _halo_backward(list(halo_grads), ctx.group_name, ctx.shard, ctx.halo_want), None, None, None


_halo.register_autograd(_halo_gradients, setup_context=_halo_setup)
for _op in (_halo, _halo_backward):
    _communicates(_op)


def compiled_halo(tensors: list[torch.Tensor], group: dist.ProcessGroup, halo_want: int) -> list[torch.Tensor]:
    """The halos [B, h, ...] of tensors [B, n, ...] (k, v, g, or the token shift's input),
    differentiable, through gatedfwa::context_parallel_halo (empty on the group's first
    rank). In the tensors' dtype: a float32 composition sends float32."""
    shard = tensors[0].shape[1]
    plan = HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), shard, halo_want)
    tails = [x[:, shard - _carried(plan):] for x in tensors]
    return _halo(tails, group.group_name, shard, halo_want)


# --------------------------------------------------------------------------------------
# The loss's messages
# --------------------------------------------------------------------------------------


@torch.library.custom_op("gatedfwa::context_parallel_next_first_labels", mutates_args=(), device_types=None)
def _next_first_labels(labels: torch.Tensor, group_name: str) -> torch.Tensor:
    """[B, 1]: the next rank's first label (IGNORE_INDEX on the last rank)."""
    from gatedfwa.distributed.sequence import next_shard_first_labels

    return next_shard_first_labels(labels, _resolve_process_group(group_name))


@_next_first_labels.register_fake
def _(labels, group_name):
    return labels.new_empty((labels.shape[0], 1))


_communicates(_next_first_labels)


def compiled_next_first_labels(labels: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _next_first_labels(labels, group.group_name)


@torch.library.custom_op("gatedfwa::context_parallel_sum", mutates_args=(), device_types=None)
def _group_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """x summed over the group (no gradient: the loss's token count)."""
    total = x.clone()
    dist.all_reduce(total, group=_resolve_process_group(group_name))
    return total


@_group_sum.register_fake
def _(x, group_name):
    return torch.empty_like(x)


_communicates(_group_sum)


def compiled_group_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _group_sum(x, group.group_name)


# --------------------------------------------------------------------------------------
# The fused path (Triton backend)
# --------------------------------------------------------------------------------------


def _link_and_offsets(q, group_name, window_size, cu_seqlens):
    group = _resolve_process_group(group_name)
    plan = HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), q.shape[1], window_size - 1)
    offsets = None if cu_seqlens is None else whole_offsets(cu_seqlens, q, plan.world)
    return HaloLink(plan, group), ShardOffsets.build(offsets, plan, q.device)


def _none_to_empty(tensors, like: torch.Tensor) -> list[torch.Tensor]:
    """Custom ops return tensors: an absent one (a call that did not run) as an empty one."""
    return [like.new_empty((0,)) if t is None else t for t in tensors]


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


@torch.library.custom_op("gatedfwa::context_parallel_attention", mutates_args=(), device_types=None)
def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                     cu_seqlens: torch.Tensor | None, window_size: int, scale: float,
                     group_name: str) -> list[torch.Tensor]:
    """[o, *SAVED] of fused.fused_forward (empty tensors for the absent ones)."""
    link, offsets = _link_and_offsets(q, group_name, window_size, cu_seqlens)
    outputs = fused_forward(q, k, v, g, window_size, scale, link, offsets)
    return _unaliased(_none_to_empty(outputs, q), [q, k, v, g])


@_fused_attention.register_fake
def _(q, k, v, g, cu_seqlens, window_size, scale, group_name):
    group = _resolve_process_group(group_name)
    plan = HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), q.shape[1], window_size - 1)
    batch, n, heads, _ = q.shape
    edge, halo = min(plan.halo_want, n), plan.halo
    first, whole = halo > 0, halo == 0 or edge < n
    empty = q.new_empty((0,))
    lse = q.new_empty((batch, heads, n), dtype=torch.float32) if whole else empty
    if not first:
        return [torch.empty_like(q), lse, *(empty for _ in SAVED[1:])]
    keys = _along_time_like(k, halo + edge)
    gates = empty if g is None else _along_time_like(g, halo + edge)
    return [torch.empty_like(q), lse, _along_time_like(q, edge), keys, torch.empty_like(keys), gates,
            _along_time_like(q, edge), q.new_empty((batch, heads, edge), dtype=torch.float32)]


@torch.library.custom_op("gatedfwa::context_parallel_attention_backward", mutates_args=(), device_types=None)
def _fused_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              g: torch.Tensor | None, cu_seqlens: torch.Tensor | None, o: torch.Tensor,
                              saved: list[torch.Tensor], window_size: int, scale: float,
                              group_name: str) -> list[torch.Tensor]:
    """[dq, dk, dv, dg] (dg empty without gates)."""
    link, offsets = _link_and_offsets(q, group_name, window_size, cu_seqlens)
    dq, dk, dv, dg = fused_backward(do, q, k, v, g, o, _empty_to_none(saved), window_size, scale, link, offsets)
    return [dq, dk, dv, q.new_empty((0,)) if dg is None else dg]


@_fused_attention_backward.register_fake
def _(do, q, k, v, g, cu_seqlens, o, saved, window_size, scale, group_name):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((0,)) if g is None else torch.empty_like(g)]


def _attention_setup(ctx, inputs, output):
    q, k, v, g, cu_seqlens, window_size, scale, group_name = inputs
    ctx.save_for_backward(q, k, v, g, cu_seqlens, *output)
    ctx.window_size, ctx.scale, ctx.group_name, ctx.has_gate = window_size, scale, group_name, g is not None


def _attention_gradients(ctx, grads):
    q, k, v, g, cu_seqlens, o, *saved = ctx.saved_tensors
    dq, dk, dv, dg = _fused_attention_backward(grads[0], q, k, v, g, cu_seqlens, o, saved, ctx.window_size,
                                               ctx.scale, ctx.group_name)
    return dq, dk, dv, (dg if ctx.has_gate else None), None, None, None, None


_fused_attention.register_autograd(_attention_gradients, setup_context=_attention_setup)
for _op in (_fused_attention, _fused_attention_backward):
    _communicates(_op)


def compiled_fused_attention(q, k, v, g, window_size: int, scale: float | None, group: dist.ProcessGroup,
                             cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """o [B, n, HQ, D] through gatedfwa::context_parallel_attention (the Triton backend)."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    contiguous = [None if x is None else x.contiguous() for x in (q, k, v, g)]
    return _fused_attention(*contiguous, cu_seqlens, window_size, scale, group.group_name)[0]
