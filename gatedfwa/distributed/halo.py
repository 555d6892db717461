"""The halo exchange of context parallelism: which keys, values and gates each rank needs
from the ranks before it, and the differentiable exchange that moves them (forward: owners
send their tail to later ranks; backward: the halo's gradients travel back to their owners,
which add them to their own).

A sequence of R * n tokens is split into R contiguous shards of n tokens; the rank at
position r of the process group holds global positions [r * n, (r + 1) * n). A query at
global position t sees keys t - w < j <= t, so rank r needs the halo of the last
L = w - 1 positions before its shard, [r * n - L, r * n) clipped at 0. When L > n the halo
spans several earlier ranks. Every rank derives every size from (r, R, n, L) alone, so sender
and receiver agree on each message without a handshake.

attach_halo puts the exchange into the autograd graph (the composition of
context_parallel.py, the token shift of sequence.py); HaloLink hands both of its halves to a
caller that drives them itself (the fused Triton path, fused.py).

Point-to-point messages go through torch.distributed.batch_isend_irecv (NCCL, gloo, ...);
between one pair of ranks they are posted in one order on both sides (k, v, then g).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from gatedfwa.distributed.partial_sums import Part, add_parts

__all__ = ["HaloPlan", "PendingHalo", "start_halo_exchange", "attach_halo", "TailGradients", "expect_tail_gradients",
           "HaloLink", "exchange_halo_now", "return_halo_gradients_now", "empty_along_time"]


@dataclass(frozen=True)
class Piece:
    """One message: `peer` is the group rank on the other side; [start, end) are positions
    in the sender's shard (for sends) or in the receiver's halo (for receives)."""

    peer: int
    start: int
    end: int


@dataclass(frozen=True)
class HaloPlan:
    """Who sends what to whom, for one rank.

    rank, world: this rank's position in the group and the group's size.
    shard: n, the tokens every rank holds. halo_want: L = w - 1.
    halo: h = min(L, rank * n), the positions received. tail: the positions of this shard that
    later ranks read, min(L, n) if a later rank exists, else 0 (they are the last `tail`
    positions of the shard).
    receives: the pieces of the halo, one per earlier rank that owns some, in halo coordinates.
    sends: the pieces of this shard that later ranks need, in shard coordinates.
    """

    rank: int
    world: int
    shard: int
    halo_want: int
    halo: int
    tail: int
    receives: tuple[Piece, ...]
    sends: tuple[Piece, ...]

    @staticmethod
    def build(rank: int, world: int, shard: int, halo_want: int) -> "HaloPlan":
        n, span = shard, halo_want
        halo = min(span, rank * n)
        halo_start = rank * n - halo  # global position of the halo's first token
        receives = []
        for owner in range(rank - 1, -1, -1):
            lo, hi = max(owner * n, halo_start), (owner + 1) * n
            if lo >= hi:
                break
            receives.append(Piece(owner, lo - halo_start, hi - halo_start))
        receives.reverse()  # in halo order, earliest owner first
        sends = []
        for reader in range(rank + 1, world):
            lo = max(0, (reader - rank) * n - span)  # first position of this shard it reads
            if lo >= n:
                break
            sends.append(Piece(reader, lo, n))
        tail = n - min([p.start for p in sends]) if sends else 0  # (a list: torch.compile traces this)
        return HaloPlan(rank, world, n, span, halo, tail, tuple(receives), tuple(sends))

    @property
    def exchanges(self) -> bool:
        """Whether this rank sends or receives anything."""
        return bool(self.receives or self.sends)


def _along_time(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """x[:, start:end] as a contiguous tensor (messages must be contiguous)."""
    return x[:, start:end].contiguous()


def _exchange(group, outgoing: list, incoming: list) -> list:
    """Post the sends [(peer, tensor)] and receives [(peer, buffer)] as one batch (peers are
    group ranks); returns the works."""
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group) for peer, t in outgoing]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for peer, t in incoming]
    return dist.batch_isend_irecv(ops) if ops else []


def empty_along_time(x: torch.Tensor, length: int) -> torch.Tensor:
    """An uninitialised tensor like x with `length` positions along dim 1."""
    return x.new_empty((x.shape[0], length, *x.shape[2:]))


class PendingHalo:
    """A forward exchange in flight. Each halo piece arrives in its own contiguous buffer (a
    slice [:, a:b] of a [B, h, ...] tensor is contiguous only for B == 1); wait() joins them
    into the halos [B, h, ...], one per exchanged tensor."""

    def __init__(self, plan: HaloPlan, group, tensors: list[torch.Tensor], first_position: int = 0):
        self.plan, self.group = plan, group
        self.pieces = [[empty_along_time(x, p.end - p.start) for p in plan.receives] for x in tensors]
        self.sent = [(p.peer, _along_time(x, p.start - first_position, p.end - first_position))
                     for p in plan.sends for x in tensors]
        incoming = [(p.peer, pieces[i]) for i, p in enumerate(plan.receives) for pieces in self.pieces]
        self.works = _exchange(group, self.sent, incoming)
        self.empty = [empty_along_time(x, 0) for x in tensors]

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        self.works, self.sent = [], []  # the sent tensors may be freed now
        return [
            pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1) if pieces else empty
            for pieces, empty in zip(self.pieces, self.empty)
        ]


def start_halo_exchange(plan: HaloPlan, group, tensors: list[torch.Tensor], first_position: int = 0) -> PendingHalo:
    """Post the forward exchange of `tensors` (each [B, n, ...]: k, v and possibly g; or, with
    first_position, the shard positions from there on: [B, n - first_position, ...], which
    must hold the tail) and return at once, so that compute can run while it is in flight."""
    with torch.no_grad():
        return PendingHalo(plan, group, [x.detach() for x in tensors], first_position)


def exchange_halo_now(plan: HaloPlan, group, tails: list[torch.Tensor], first_position: int) -> list[torch.Tensor]:
    """The forward exchange, waited for: the halos [B, h, ...] of tails [B, n - first_position,
    ...] (this shard's positions of k, v, g from first_position on, the tail included), in the
    tails' dtype. For a caller that cannot keep an exchange in flight (torch.compile's custom
    ops, compiled.py)."""
    return start_halo_exchange(plan, group, tails, first_position).wait()


def return_halo_gradients_now(plan: HaloPlan, group, halo_grads: list[torch.Tensor],
                              first_position: int) -> list[torch.Tensor]:
    """The backward exchange, waited for: sends halo_grads [B, h, ...] to their owners and
    returns the gradients of this shard's positions from first_position on
    [B, n - first_position, ...] (<= n - plan.tail) that later ranks sent back (zeros where
    none did), in halo_grads' dtype."""
    exchange = TailGradients()
    exchange.post(plan, group, halo_grads)
    tail_grads = [empty_along_time(d, plan.shard - first_position).zero_() for d in halo_grads]
    exchange.add_to(tail_grads, first_position)
    return tail_grads


class TailGradients:
    """The backward's gradient exchange in flight, from the halo's backward, which posts it,
    to the backward of expect_tail_gradients' identity, which waits for it (or, on the fused
    path, within one backward: HaloLink.post_gradients posts it, add_to waits)."""

    def __init__(self):
        self.works: list | None = None
        self.received: list[list[torch.Tensor]] = []
        self.plan: HaloPlan | None = None

    def post(self, plan: HaloPlan, group, halo_grads) -> None:
        """Send the halo's gradients to their owners; receive this rank's tail gradients."""
        outgoing = [(p.peer, _along_time(d, p.start, p.end)) for p in plan.receives for d in halo_grads]
        self.received = [[empty_along_time(d, p.end - p.start) for d in halo_grads] for p in plan.sends]
        incoming = [(p.peer, t) for p, ts in zip(plan.sends, self.received) for t in ts]
        self.plan, self.works = plan, _exchange(group, outgoing, incoming)

    def add_to(self, grads: list[torch.Tensor], first_position: int, more: list[Part] = ()) -> None:
        """Wait for the exchange and add the received pieces (they overlap when the window
        spans several shards), and the parts in `more`, in place to grads [B, *, ...], which
        cover the shard positions from first_position on (`more` in grads' coordinates).
        Rows that take several parts are summed in float32 and rounded once
        (partial_sums.add_parts)."""
        if self.works is None:
            raise RuntimeError("the halo's backward has not posted its gradient exchange yet")
        for work in self.works:
            work.wait()
        received = [(p.start - first_position, p.end - first_position, pieces)
                    for p, pieces in zip(self.plan.sends, self.received)]
        add_parts(grads, [*more, *received])
        self.works, self.received = None, []


class HaloLink:
    """Both exchanges of one call, for code that drives them itself instead of through the
    autograd graph (the fused Triton path, gatedfwa/distributed/fused.py): start() posts the
    forward exchange, post_gradients() the backward's. A benchmark may stand in a subclass
    that moves nothing (compute alone)."""

    def __init__(self, plan: HaloPlan, group):
        self.plan, self.group = plan, group

    def start(self, tensors: list[torch.Tensor]) -> PendingHalo:
        """Post the forward exchange of k, v (and g), each [B, n, ...]; wait() gives the halos."""
        return start_halo_exchange(self.plan, self.group, tensors)

    def post_gradients(self, halo_grads: list[torch.Tensor]) -> TailGradients:
        """Send the halo's gradients halo_grads [B, h, ...] (one per exchanged tensor; [B, 0, ...]
        on a rank without a halo) to their owners and receive this shard's tail gradients;
        add_to(grads, 0) on the result waits and adds them to grads [B, n, ...] in place."""
        exchange = TailGradients()
        exchange.post(self.plan, self.group, halo_grads)
        return exchange


class _AttachHalo(torch.autograd.Function):
    """Connects the received halo to the autograd graph.

    Forward: waits for the exchange and returns the halos [B, h, ...] as outputs whose inputs
    are the tails [B, tail, ...] of this rank's own tensors (what later ranks read).
    Backward: sends the halo's gradients back to their owners and receives the gradients of
    this rank's tail from the later ranks that read it. Without `deferred` it waits and
    returns them as the tails' gradients; with it, it returns at once and the backward of
    expect_tail_gradients' identity waits and adds them (see there).
    """

    @staticmethod
    def forward(ctx, pending: PendingHalo, deferred: TailGradients | None, *tails: torch.Tensor):
        ctx.plan, ctx.group, ctx.deferred = pending.plan, pending.group, deferred
        # The halos in the tails' dtype: the exchange may carry a narrower one (a float32
        # composition sends its bfloat16 inputs; widening them is exact), while the gradients
        # travel back in the tails' dtype, unrounded.
        return tuple(halo.to(tail.dtype) for halo, tail in zip(pending.wait(), tails))

    @staticmethod
    def backward(ctx, *halo_grads: torch.Tensor):
        plan = ctx.plan
        exchange = TailGradients() if ctx.deferred is None else ctx.deferred
        exchange.post(plan, ctx.group, halo_grads)
        if ctx.deferred is not None:
            return (None, None, *(None for _ in halo_grads))
        tail_grads = [empty_along_time(d, plan.tail).zero_() for d in halo_grads]
        exchange.add_to(tail_grads, plan.shard - plan.tail)
        return (None, None, *tail_grads)


class _ReceiveTailGradients(torch.autograd.Function):
    """Identity forward; backward waits for the tail gradients and adds them (see
    expect_tail_gradients)."""

    @staticmethod
    def forward(ctx, exchange: TailGradients, *tensors: torch.Tensor):
        ctx.exchange = exchange
        return tuple(x.view_as(x) for x in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        grads = [g.clone() for g in grads]  # the incoming gradients are not ours to change
        ctx.exchange.add_to(grads, 0)
        return (None, *grads)


def expect_tail_gradients(tensors: list[torch.Tensor]) -> tuple[TailGradients, list[torch.Tensor]]:
    """For a backward that overlaps the gradient exchange with compute: returns a
    TailGradients to pass to attach_halo and `tensors` through an identity, to be used in their
    place from here on (the halo's tails included). The halo's backward then only posts the
    exchange, and the identity's backward waits for it: autograd runs that last, once every
    use of the tensors has given its gradient, so the exchange overlaps the backward of the
    computations that do not read the halo."""
    exchange = TailGradients()
    return exchange, list(_ReceiveTailGradients.apply(exchange, *tensors))


def attach_halo(pending: PendingHalo, tensors: list[torch.Tensor],
                deferred: TailGradients | None = None) -> list[torch.Tensor]:
    """Wait for `pending` and return the halos [B, h, ...] of `tensors` (the k, v, g that
    started the exchange, or wider copies of them: the halos then come in the copies' dtype),
    differentiable: their gradients flow back to the owners' tensors.
    With `deferred` (from expect_tail_gradients, whose returned tensors are `tensors` here)
    the backward's wait for the returning gradients moves to the identity's backward.

    Every rank of the group must run the backward through these halos (even an empty one),
    since each backward posts its half of the gradient exchange."""
    tails = [x[:, x.shape[1] - pending.plan.tail:] for x in tensors]
    return list(_AttachHalo.apply(pending, deferred, *tails))
