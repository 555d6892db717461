"""Context-parallel gated window attention: one sequence split across the ranks of a process
group, each rank computing the queries of its own shard (docs/distributed.md).

Two paths with one result:

- Triton backend (gatedfwa/ops/backend.py): fused.py, one KernelOp (eager and compiled) that
  calls the kernels and the exchange itself and owns its buffers (the whole shard in one call while the
  halo travels, then the first w - 1 queries again against the halo; no full-size copies).
- Every other backend (the PyTorch path), and the reference the fused path is tested
  against: the composition below through the public op. `gated_window_attention` takes
  fewer queries than keys, so the queries run against the concatenation [halo ‖ shard] of k,
  v and g, the queries aligned to its end. Each query's window lies inside halo ‖ shard, and
  the gate sums across the shard boundary are exact because the halo's gates are included.

Overlap in the composition: when the shard is longer than w - 1, the queries at shard
positions >= w - 1 see only the shard, so they are computed while the halo is in flight; the
first w - 1 queries are computed after it arrives (on [halo ‖ first w - 1 positions]). In the
backward, autograd runs those first queries' backward first (it was recorded last); it yields
the halo's dk, dv, dg, whose exchange is posted at once and runs while the interior queries'
backward does (halo.expect_tail_gradients): the wait for the gradients returning from later
ranks comes only after that.

Precision: on the PyTorch path a bfloat16 or float16 call runs the composition in float32
(composition_dtype), so that a key's gradient parts are summed before the one rounding;
on the fused path each row's parts are summed in float32 and rounded once
(partial_sums.add_parts), the parts themselves coming rounded from the kernels.

Packed sequences (cu_seqlens of the whole sequence): each call takes the offsets of the
sequences that cross its keys' span (packed.py). Under torch.compile: compiled.py.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from gatedfwa.distributed.compiled import compiled_halo
from gatedfwa.distributed.fused import fused_context_parallel_attention
from gatedfwa.distributed.halo import HaloPlan, attach_halo, expect_tail_gradients, start_halo_exchange
from gatedfwa.distributed.packed import ShardOffsets, whole_offsets
from gatedfwa.ops import gated_window_attention
from gatedfwa.ops.backend import select_backend
from gatedfwa.environment import check_values_on_device
from gatedfwa.ops.common.validation import check_attention_args

__all__ = ["context_parallel_gated_window_attention", "context_parallel_attention_eager", "composition_dtype"]


def _check_window(window_size) -> None:
    if window_size is None:
        raise ValueError(
            "window_size must be an int >= 1 for context-parallel attention, got None: full causal "
            "attention would need every earlier shard as its halo; context parallelism here is for "
            "a sliding window, whose halo is the last window_size - 1 tokens"
        )


def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context_parallel_gated_window_attention needs an initialised torch.distributed process "
            "group (torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return dist.group.WORLD if group is None else group


def _signature(q, k, g, window_size, scale, offsets) -> list[float]:
    """What must agree on every rank: shapes (the shard length included), gate presence,
    window, scale, dtype, and the packed sequences' offsets (their count and a checksum)."""
    dtype_code = [torch.float16, torch.bfloat16, torch.float32].index(q.dtype)
    packed = [-1.0, -1.0] if offsets is None else [len(offsets), float(sum((i + 1) * c for i, c in enumerate(offsets)))]
    return [*q.shape, k.shape[2], float(g is not None), window_size, -1.0 if scale is None else scale, dtype_code,
            *packed]


def _check_same_shards(q, k, g, window_size, scale, group, offsets=None) -> None:
    """All ranks hold shards of one shape, with one window, scale, dtype and cu_seqlens. One
    small all_gather: done for CPU tensors always, on other devices only with
    GATEDFWA_CHECK_VALUES=1 (it syncs the host with the device)."""
    if q.device.type != "cpu" and not check_values_on_device():
        return
    mine = torch.tensor(_signature(q, k, g, window_size, scale, offsets), dtype=torch.float64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    names = ["batch", "shard length", "query heads", "head_dim", "key/value heads", "has gate",
             "window_size", "scale", "dtype", "cu_seqlens (count)", "cu_seqlens (values)"]
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, mine):
            differing = [name for name, a, b in zip(names, mine.tolist(), theirs.tolist()) if a != b]
            raise ValueError(
                "context-parallel shards must agree on every rank of the group (the same shard length, "
                f"shapes, gate, window_size, scale, dtype and cu_seqlens); group rank {rank} differs from group rank "
                f"{dist.get_rank(group)} in: {', '.join(differing)}"
            )


def context_parallel_gated_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    window_size: int,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated sliding-window attention over a sequence split across the ranks of `group`.

    The group rank r holds positions [r * n, (r + 1) * n) of one sequence of R * n tokens
    (rank order is sequence order); the result on rank r equals rows [r * n, (r + 1) * n) of
    gated_window_attention on the whole sequence, forward and backward (the gradients of the
    halo the later ranks read arrive back here and are added to this rank's).

    Args:
        q: [B, n, HQ, D] this rank's queries; float16, bfloat16 or float32.
        k, v: [B, n, H, D] this rank's keys and values (HQ % H == 0).
        g: [B, n, HQ] this rank's log gates (<= 0), or None for plain sliding-window attention.
        window_size: w >= 1, keys visible to a query, itself included. None (full causal) is
            refused: its halo would be the whole prefix.
        group: the context-parallel process group (default: the world).
        scale: logit scale, default D ** -0.5.
        cu_seqlens: packed sequences (B == 1): int32 (or int64) [N + 1] offsets of the N
            sequences laid end to end along the whole sequence of R * n tokens (positions of
            the whole sequence, from 0 to R * n), the same on every rank. A sequence may
            cross shard boundaries; nothing crosses a sequence start, the halo included.
            Read on the host once per call (as the single-process op reads its offsets).

    Every rank must call this with the same n, shapes, window, scale, dtype and cu_seqlens
    (checked with one small all_gather on CPU tensors; on GPUs with GATEDFWA_CHECK_VALUES=1),
    and every rank must run the backward through the output, since the backward exchanges
    gradients. Under torch.compile the call is one opaque custom op (compiled.py), so a
    compiled model step holds no graph break here.

    Returns:
        o [B, n, HQ, D] in q's dtype.
    """
    _check_window(window_size)
    check_attention_args(q, k, v, g, window_size, scale, None)
    if q.shape[1] == 0:
        raise ValueError("q must hold at least one position per rank (a shard of length >= 1), got 0")
    group = _resolve_group(group)
    if torch.compiler.is_compiling():
        return _compiled(q, k, v, g, window_size, scale, group, cu_seqlens)
    offsets = None if cu_seqlens is None else whole_offsets(cu_seqlens, q, dist.get_world_size(group))
    _check_same_shards(q, k, g, window_size, scale, group, offsets)
    return context_parallel_attention_eager(q, k, v, g, window_size, scale, group, cu_seqlens, offsets)


def context_parallel_attention_eager(q, k, v, g, window_size: int, scale: float | None, group,
                                     cu_seqlens: torch.Tensor | None, offsets: list[int] | None) -> torch.Tensor:
    """The op on validated arguments, outside torch.compile: the fused path on the Triton
    backend, the composition on the others. cu_seqlens of the whole packed sequence and its
    packed.whole_offsets, or both None."""
    plan = HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), q.shape[1], window_size - 1)
    calls = ShardOffsets.build(offsets, plan, q.device)
    if not plan.exchanges:  # one rank, or w = 1: nothing crosses a shard boundary
        return gated_window_attention(q, k, v, g, window_size=window_size, scale=scale, cu_seqlens=calls.whole)

    backend = select_backend(q.device)
    if backend == "triton":
        return fused_context_parallel_attention(q, k, v, g, window_size, scale, group, cu_seqlens)
    dtype = composition_dtype(q, backend)
    wide_g = None if g is None else g.to(torch.promote_types(g.dtype, dtype))  # gates are never narrowed
    o = _composed(q.to(dtype), k.to(dtype), v.to(dtype), wide_g, window_size, scale, plan, group,
                  sent=[k, v] if g is None else [k, v, g], calls=calls)
    return o.to(q.dtype)


def _compiled(q, k, v, g, window_size: int, scale: float | None, group, cu_seqlens) -> torch.Tensor:
    """The op under torch.compile (compiled.py): on the Triton backend the fused path as one
    custom op; on the others the composition traced around the halo's custom op."""
    plan = HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), q.shape[1], window_size - 1)
    if not plan.exchanges:
        # One rank: the offsets are the shard's. w = 1: a query sees itself only, and its
        # decay sums are empty, so sequences do not matter.
        return gated_window_attention(q, k, v, g, window_size=window_size, scale=scale,
                                      cu_seqlens=cu_seqlens if plan.world == 1 else None)
    backend = select_backend(q.device)
    if backend == "triton":
        return fused_context_parallel_attention(q, k, v, g, window_size, scale, group, cu_seqlens)
    if cu_seqlens is not None:
        raise ValueError(
            "cu_seqlens under torch.compile needs the Triton backend (GATEDFWA_BACKEND, gatedfwa/ops/backend.py): "
            "the PyTorch path's composition would read the offsets on the host while tracing; run it eagerly")
    dtype = composition_dtype(q, backend)
    wide_g = None if g is None else g.to(torch.promote_types(g.dtype, dtype))
    o = _composed(q.to(dtype), k.to(dtype), v.to(dtype), wide_g, window_size, scale, plan, group, sent=None,
                  calls=ShardOffsets())
    return o.to(q.dtype)


def composition_dtype(q: torch.Tensor, backend: str) -> torch.dtype:
    """The dtype the composition runs in: float32 for float16/bfloat16 inputs on the PyTorch
    path, which computes in float32 whatever its inputs (a float32 call gives the same output
    before the final rounding). Then the gradient parts of a key near a shard boundary (the
    interior and first rows' calls, the halo's part that a later rank sends back) are summed
    unrounded and rounded once, by the cast back to the input's dtype, as on one process;
    in the input's dtype each part would be rounded first and the sum again. On the Triton
    backend (under torch.compile) the input's dtype: the kernels take their precision from it."""
    if backend != "triton" and q.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return q.dtype


def _offsets(call: tuple[torch.Tensor, torch.Tensor | None] | None) -> dict:
    """The public op's offset arguments for one of ShardOffsets' calls."""
    if call is None:
        return {}
    keys, queries = call
    return {"cu_seqlens": keys} if queries is None else {"cu_seqlens_k": keys, "cu_seqlens_q": queries}


def _composed(q, k, v, g, window_size, scale, plan: HaloPlan, group, sent, calls: ShardOffsets) -> torch.Tensor:
    """The composition through the public op (every backend; the reference of fused.py).
    q, k, v, g in the dtype it runs in; `sent`: the k, v (and g) to send, the same tensors or
    narrower ones with the same values (the halo is widened on arrival), or None under
    torch.compile (the halo's custom op sends k, v, g themselves); `calls`: the offsets of
    packed sequences."""
    exchanged = [k, v] if g is None else [k, v, g]
    if sent is None:
        halos = compiled_halo(exchanged, group, plan.halo_want)
    else:
        pending = start_halo_exchange(plan, group, sent)
        # From here on k, v, g pass through an identity whose backward waits for the gradients
        # later ranks send back for this shard's tail, so that the wait comes last.
        returning, exchanged = expect_tail_gradients(exchanged)
        k, v = exchanged[:2]
        g = exchanged[2] if g is not None else None
    n, edge = plan.shard, min(plan.halo_want, plan.shard)  # edge: queries that need the halo
    interior = None
    if edge < n:
        # Queries at shard positions >= w - 1 see only this shard: compute them while the halo
        # travels, as the last n - edge queries against all n keys.
        interior = gated_window_attention(q[:, edge:], k, v, g, window_size=window_size, scale=scale,
                                          **_offsets(calls.interior))
    if sent is not None:
        halos = attach_halo(pending, exchanged, returning)
    keys, values = (torch.cat([halo, x[:, :edge]], dim=1) for halo, x in zip(halos[:2], (k, v)))
    gates = None if g is None else torch.cat([halos[2], g[:, :edge]], dim=1)
    # The first `edge` queries against [halo ‖ first edge keys]: fewer queries than keys.
    first = gated_window_attention(q[:, :edge], keys, values, gates, window_size=window_size, scale=scale,
                                   **_offsets(calls.first))
    return first if interior is None else torch.cat([first, interior], dim=1)
