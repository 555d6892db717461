"""Packed variable-length batches: sequences laid end to end along T (B == 1), delimited by
cu_seqlens [N + 1] (offsets, starting at 0 and ending at T). Without cu_seqlens each batch
row is one sequence of length T; kernels then index tokens as b * T + t."""

from __future__ import annotations

import torch

from gatedfwa.ops.triton_support import jit, tl

__all__ = ["longest_sequence", "sequence_spans", "sequence_bounds"]


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
