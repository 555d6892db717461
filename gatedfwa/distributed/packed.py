"""Packed sequences under context parallelism: the offsets of the whole sequence turned into
the offsets each call on a rank's shard needs (docs/distributed.md, "Packed sequences").

With packed sequences the whole sequence of R * n tokens holds N sequences laid end to end,
delimited by cu_seqlens [N + 1] in whole-sequence positions, the same tensor on every rank;
a sequence may start on one rank and end on another. Rank r's calls take the queries at the
whole-sequence positions [query_start, end) against the keys at [key_start, end), with
key_start <= query_start (the shard, or the halo before the first rows). Such a call needs
the sequences that cross its keys' span, cut to it:

    whole sequence  |  seq 0    |       seq 1        |  seq 2   |     seq 3        |
    a call's keys               [key_start ----------------------------- end)
                                           [query_start ---------------- end)
    cu_seqlens_k                [0        ,              a,         b,     end - key_start]
    cu_seqlens_q                [0        ,              0,     b - q,     end - query_start]

where every cut sequence keeps its queries aligned to its last keys (the op's rule for fewer
queries than keys, docs/math.md), a sequence whose keys all lie before query_start has no
queries, and no key of one sequence is seen by a query of another: the halo a rank receives
reaches a query only where the query's own sequence started on an earlier rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gatedfwa.distributed.halo import HaloPlan

__all__ = ["whole_offsets", "call_offsets", "ShardOffsets"]


def whole_offsets(cu_seqlens: torch.Tensor, q: torch.Tensor, world: int) -> list[int]:
    """The offsets of cu_seqlens on the host, checked: int32 or int64 [N + 1], 1-D, on q's
    device, from 0 to the whole sequence's length R * n, non-decreasing; q [1, n, HQ, D] is
    this rank's shard (batch 1: the sequences are packed along the positions)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries [0, ..., R * n], got shape "
                         f"{list(cu_seqlens.shape)}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along the positions), "
                         f"got {q.shape[0]}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    offsets = cu_seqlens.tolist()
    length = world * q.shape[1]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    if offsets[-1] != length:
        raise ValueError(
            f"cu_seqlens must end at the whole sequence's length, R * n = {world} x {q.shape[1]} = {length} "
            f"(its offsets count the positions of all ranks' shards), got {offsets[-1]}")
    return offsets


def call_offsets(offsets: list[int], key_start: int, query_start: int, end: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cu_seqlens_k, cu_seqlens_q) int32 of a call whose keys sit at the whole-sequence
    positions [key_start, end) and its queries at [query_start, end) (see the module
    docstring); cu_seqlens_q is None when the queries are the keys (query_start == key_start).
    offsets: whole_offsets' list."""
    if not key_start <= query_start <= end:
        raise ValueError(f"expected key_start <= query_start <= end, got {key_start}, {query_start}, {end}")
    # Repeated offsets (empty sequences) give one bound: every cut sequence holds keys.
    bounds = [key_start, *sorted({c for c in offsets if key_start < c < end}), end]
    keys = torch.tensor([b - key_start for b in bounds], dtype=torch.int32, device=device)
    if query_start == key_start:
        return keys, None
    queries = torch.tensor([max(b, query_start) - query_start for b in bounds], dtype=torch.int32, device=device)
    return keys, queries


@dataclass(frozen=True)
class ShardOffsets:
    """The offsets of a rank's calls (None where the sequences are not packed, or where the
    call does not run). Shard positions: the shard starts at rank * n; edge = min(w - 1, n)
    first rows; halo h.

    whole: the shard's queries against its keys (the fused path's whole-shard call), as
        cu_seqlens.
    interior: (cu_seqlens_k, cu_seqlens_q) of the queries [edge, n) against the shard's keys
        (the composition's interior call).
    first: (cu_seqlens_k, cu_seqlens_q) of the first edge queries against [halo ‖ first edge
        keys].
    """

    whole: torch.Tensor | None = None
    interior: tuple[torch.Tensor, torch.Tensor | None] | None = None
    first: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @staticmethod
    def build(offsets: list[int] | None, plan: HaloPlan, device: torch.device) -> "ShardOffsets":
        if offsets is None:
            return ShardOffsets()
        n, start = plan.shard, plan.rank * plan.shard
        edge = min(plan.halo_want, n)
        whole = call_offsets(offsets, start, start, start + n, device)[0]
        interior = call_offsets(offsets, start, start + edge, start + n, device) if edge < n else None
        first = call_offsets(offsets, start - plan.halo, start, start + edge, device)
        return ShardOffsets(whole, interior, first)
