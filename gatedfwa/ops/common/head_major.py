"""Device helpers that address the kernels' head-major buffers.

Row statistics (lse, delta, dU, ...) and gate sums are stored [sequences, heads, T],
contiguous along time, so that a tile reads a stretch of positions in one load; the kernels
index tokens by their flattened position p = b * T + t (the packed position with cu_seqlens,
where there is one sequence row, B == 1).
"""

from __future__ import annotations

# Triton is optional: without it these functions are defined but never compiled.
from gatedfwa.ops.common.triton_support import jit, tl

__all__ = ["head_row", "batch_shift"]


@jit
def head_row(seq, head, num_heads):
    """The row of (sequence seq, head) in a [sequences, num_heads, ...] buffer:
    seq * num_heads + head; its first element is at head_row(...) * the row length."""
    return seq * num_heads + head


@jit
def batch_shift(seq, num_heads, seqlen, VARLEN: tl.constexpr):
    """How much further than the flattened token p = b * T + t alone says batch row b's head h
    starts in a [B, H, T] buffer: (H - 1) * T * b (0 with VARLEN, where B == 1). Head h's row
    of batch b then starts at h * T + batch_shift + b * T."""
    if VARLEN:
        return 0
    else:
        return seq * (num_heads - 1) * seqlen
