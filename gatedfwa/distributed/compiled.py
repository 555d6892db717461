"""Context parallelism under torch.compile: the communication as torch.library custom ops,
which the compiler keeps as opaque nodes of a known shape (docs/distributed.md, "Under
torch.compile").

torch.compile cannot trace point-to-point messages (batch_isend_irecv) or keep an exchange in
flight across the graph, so a compiled model step reaches them through these ops; a process
group is named by its group_name (a string, as custom ops take no group object):

    gatedfwa::context_parallel_attention (+ _backward)
                                the whole window op on the Triton backend: fused.py's KernelOp,
                                the same op eager calls take, its exchange overlapped with the
                                kernels inside the op
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
shapes: the forward ops are ordered effects (ordered.mark_ordered), and each backward exchange
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

from gatedfwa.distributed.halo import HaloPlan, empty_along_time, exchange_halo_now, return_halo_gradients_now
from gatedfwa.distributed.ordered import mark_ordered

__all__ = ["compiled_halo", "compiled_next_first_labels", "compiled_group_sum"]

IGNORE_INDEX = -100


def _plan(group_name: str, shard: int, halo_want: int) -> tuple[HaloPlan, dist.ProcessGroup]:
    group = _resolve_process_group(group_name)
    return HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), shard, halo_want), group


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
    return [empty_along_time(t, plan.halo) for t in tails]


@torch.library.custom_op("gatedfwa::context_parallel_halo_backward", mutates_args=(), device_types=None)
def _halo_backward(halo_grads: list[torch.Tensor], group_name: str, shard: int, halo_want: int) -> list[torch.Tensor]:
    """The tails' gradients [B, c, ...] (c = _carried): the halo's gradients go back to their
    owners."""
    plan, group = _plan(group_name, shard, halo_want)
    return return_halo_gradients_now(plan, group, [d.contiguous() for d in halo_grads], shard - _carried(plan))


@_halo_backward.register_fake
def _(halo_grads, group_name, shard, halo_want):
    plan, _ = _plan(group_name, shard, halo_want)
    return [empty_along_time(d, _carried(plan)) for d in halo_grads]


def _halo_setup(ctx, inputs, output):
    _, ctx.group_name, ctx.shard, ctx.halo_want = inputs


def _halo_gradients(ctx, halo_grads):
    return _halo_backward(list(halo_grads), ctx.group_name, ctx.shard, ctx.halo_want), None, None, None


_halo.register_autograd(_halo_gradients, setup_context=_halo_setup)
for _op in (_halo, _halo_backward):
    mark_ordered(_op)


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


mark_ordered(_next_first_labels)


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


mark_ordered(_group_sum)


def compiled_group_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _group_sum(x, group.group_name)
