"""Packed variable-length batches: sequences laid end to end along T (B == 1), delimited by
cu_seqlens [N + 1] (offsets, starting at 0 and ending at T). Without cu_seqlens each batch
row is one sequence of length T; kernels then index tokens as b * T + t."""

from __future__ import annotations

import torch

from gatedfwa.ops.common.triton_support import jit, tl

__all__ = ["longest_sequence", "sequence_spans", "query_key_spans", "sequence_bounds", "query_bounds"]


def longest_sequence(cu_seqlens: torch.Tensor | None, seqlen: int) -> int:
    """The longest sequence's length: seqlen without cu_seqlens, else read on the host."""
    if cu_seqlens is None:
        return seqlen
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def sequence_spans(cu_seqlens: torch.Tensor | None, batch: int, seqlen: int) -> list[tuple[int, int, int]]:
    """(batch row, start, stop) of every sequence: one per row without cu_seqlens, else the
    packed sequences of row 0 (read on the host)."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    offsets = cu_seqlens.tolist()
    return [(0, offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]


def query_key_spans(
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, batch: int, seqlen_q: int, seqlen_k: int,
) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """(batch row, (q start, q stop), (k start, k stop)) of every sequence, when queries may be
    fewer than keys: cu_seqlens_q None means q's sequences are delimited like k's (by
    cu_seqlens_k, or one per row)."""
    keys = sequence_spans(cu_seqlens_k, batch, seqlen_k)
    if cu_seqlens_q is None and cu_seqlens_k is not None:
        queries = keys
    else:
        queries = sequence_spans(cu_seqlens_q, batch, seqlen_q)
    return [(b, (qa, qb), (ka, kb)) for (b, qa, qb), (_, ka, kb) in zip(queries, keys)]


@jit
def sequence_bounds(cu_seqlens, seq, seqlen, VARLEN: tl.constexpr):
    """In a kernel: [bos, eos) of sequence `seq` among the flattened tokens."""
    if VARLEN:
        bos = tl.load(cu_seqlens + seq).to(tl.int32)
        eos = tl.load(cu_seqlens + seq + 1).to(tl.int32)
    else:
        bos = seq * seqlen
        eos = bos + seqlen
    return bos, eos


@jit
def query_bounds(cu_seqlens_q, seq, seqlen_q, bos, eos, VARLEN: tl.constexpr, FEWER_QUERIES: tl.constexpr):
    """In a kernel whose rows are key positions: (query_start, shift) of sequence `seq` with
    key bounds [bos, eos). Its queries sit at the key positions [query_start, eos) (aligned
    to the end), and query row = key position + shift among q's flattened tokens. Without
    FEWER_QUERIES (q and k laid out alike) query_start = bos and shift = 0, both known at compile
    time."""
    if FEWER_QUERIES:
        q_bos, q_eos = sequence_bounds(cu_seqlens_q, seq, seqlen_q, VARLEN)
        shift = q_eos - eos
        query_start = q_bos - shift
    else:
        query_start = bos
        shift = 0
    return query_start, shift
