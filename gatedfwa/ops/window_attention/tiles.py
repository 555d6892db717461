"""Device helpers shared by the forward and backward kernels: the gate's chunk-local sums
assembled into per-tile decay terms (docs/math.md, "Numerics"), and tensor descriptors.
(Sequence bounds and the head-major rows: gatedfwa/ops/common/varlen.py and head_major.py.)

Triton kernels for gated sliding-window attention: forward, and backward (dq, dk, dv, dg).

Math and notation: docs/math.md. Each query t sees keys j with bos <= j <= t and t - j < w;
the logit of (t, j) is scale * q_t . k_j + U_t - U_j, with U the running sum of the log
gates g inside the sequence.

Numerical stability without a global cumulative sum
---------------------------------------------------
Only differences U_t - U_j with t - j < w are ever needed, so every program measures U from
its own reference point r: L_i = U_i - U_r. A forward/dq program that owns query rows
[m0, m0 + BLOCK_M) takes r = m0 - 1; a dk/dv program that owns keys [n0, n0 + BLOCK_N)
takes r = n0 + BLOCK_N - 1. Either way r lies between every key and query of the
off-diagonal tiles, where L_t <= 0 <= L_j (gates are <= 0): the bias L_t - L_j is then a sum
of two same-signed terms and rounds like any sum, with no cancellation. L is assembled from
the chunk-local gate sums of chunk_sums.py (inclusive prefix P and exclusive suffix S inside
chunks of GATE_CHUNK positions; every tile is a whole number of chunks) and a running sum of
tile totals while the program walks outward from the diagonal, so its magnitude is bounded by
one window, never by the sequence length, and no program scans gates itself. Only inside the
diagonal tiles, where keys and queries interleave, does L_t - L_j cancel, and there |L| is
bounded by one tile's gate sum. The sums come in base 2 (times log2(e)), like the logits.

Applying the decay at no per-element cost
-----------------------------------------
Off the diagonal, L_t - L_j splits into a term per query row and a term per key that is the
loaded sum itself (the suffix S inside the tile for forward/dq, whose reference lies right of
the keys). The key term is added to the scores where they are scaled (one fused multiply-add,
as the ungated kernel's multiply); the row term joins the per-row constant the softmax
subtracts anyway: the running maximum in the forward, lse in dq, and in dk/dv, whose rows are
keys, lse2 - P[t] precomputed per query by the delta kernel. Only the diagonal tiles form
L_t - L_j per pair, so that a key's decay to itself is exactly 0.

Tiles
-----
Forward and dq programs walk key tiles (one walk for both, walk.py) in two phases: the tiles
on the diagonal (causal mask), then the tiles to the left, nearest first. Tiles wholly inside
every row's window are processed without any mask; only the diagonal tiles and the tiles at
the far edge of the window are masked. Tiles outside the window are never loaded. The dk/dv
program mirrors this over query tiles.

The gate gradient: d loss / d U_t = rowsum_j dS_tj - colsum_i dS_it, and
dg_s = sum_{t >= s} dU_t, a reverse cumulative sum inside each sequence (run in float64).
It equals the sum of dS over the pairs (t, j) with j < s <= t, a local quantity, but the
reverse sum only telescopes to it if the row and column sums agree to float32 rounding: both
are float32 sums of the float32 dS (rows in the dq kernel, columns in the dk/dv kernel, each
a reduction inside the matmul layout's thread groups, no atomics). The dq kernel writes the
row sums to dU, and the dk/dv kernel, which runs after it, subtracts its column sums there.
tests/ops/window_attention/test_attention.py checks that dg's error does not grow towards
the sequence start.

Layouts: q/o [B*T, HQ, D], k/v [B*T, H, D] (the caller's [B, T, ., D] flattened), gate sums
[2, B, HQ, T] float32 (contiguous along time), lse/delta/lse2 - P/dU [B, HQ, T]
float32. With cu_seqlens, B == 1.
The kernels keep the log-sum-exp in base 2 (lse2 = lse * log2(e)): the forward writes it and
the backward reads it without converting back and forth.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "tile_carry", "tile_prefix", "tile_suffix", "suffix_sums_left_of", "NO_DECAY", "PAIR_DECAY", "SPLIT_DECAY",
    "sequence_descriptor",
]


@triton.jit
def _chunk_total(p_head, chunk_start, eos, live, CHUNK: tl.constexpr):
    """Sum of the gates of the chunk that starts at chunk_start (0 past the sequence end, or
    when not live): the chunk's inclusive prefix sum at its last valid position."""
    last = tl.minimum(chunk_start + CHUNK - 1, eos - 1)
    return tl.load(p_head + last, mask=(chunk_start < eos) & live, other=0.0)


@triton.jit
def tile_carry(p_head, offs, start, eos, live, TILE: tl.constexpr, CHUNK: tl.constexpr, BEFORE: tl.constexpr):
    """For a tile [start, start + TILE) of whole chunks: the tile's gate total, and per position
    the totals of the tile's other chunks before (BEFORE) or after its own. All zero when the
    tile is one chunk, which is the case of every tile for D <= 128."""
    total = _chunk_total(p_head, start, eos, live, CHUNK)
    carry = tl.zeros(offs.shape, dtype=tl.float32)
    if TILE > CHUNK:
        previous = total
        for c in tl.static_range(1, TILE // CHUNK):
            chunk_sum = _chunk_total(p_head, start + c * CHUNK, eos, live, CHUNK)
            if BEFORE:
                carry += tl.where(offs >= start + c * CHUNK, previous, 0.0)
            else:
                carry += tl.where(offs < start + c * CHUNK, chunk_sum, 0.0)
            previous = chunk_sum
            total += chunk_sum
    return carry, total


@triton.jit
def _tile_sums(plane_head, p_head, offs, start, eos, live, TILE: tl.constexpr, CHUNK: tl.constexpr,
               MASKED: tl.constexpr, PREFIX: tl.constexpr):
    """One plane of the chunk sums over the tile [start, start + TILE), completed to tile sums
    with the totals of the tile's other chunks (before t's for the prefix plane, after j's
    for the suffix plane), and the tile's total. live (a scalar) false: nothing is read, all 0."""
    if MASKED:
        sums = tl.load(plane_head + offs, mask=(offs < eos) & live, other=0.0)
    else:
        sums = tl.load(plane_head + offs, mask=live, other=0.0)
    carry, total = tile_carry(p_head, offs, start, eos, live, TILE, CHUNK, PREFIX)
    if TILE > CHUNK:
        sums += carry
    return sums, total


@triton.jit
def tile_prefix(p_head, offs, start, eos, live, TILE: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr):
    """Inclusive prefix sums of the gates inside the tile [start, start + TILE) and the tile's
    total: P[t] plus the totals of the tile's chunks before t's, all terms of one sign."""
    return _tile_sums(p_head, p_head, offs, start, eos, live, TILE, CHUNK, MASKED, True)


@triton.jit
def tile_suffix(p_head, s_head, offs, start, eos, live, TILE: tl.constexpr, CHUNK: tl.constexpr,
                 MASKED: tl.constexpr):
    """Exclusive suffix sums g[j+1] + ... + g[tile end] inside the tile [start, start + TILE)
    and the tile's total: S[j] plus the totals of the tile's chunks after j's."""
    return _tile_sums(s_head, p_head, offs, start, eos, live, TILE, CHUNK, MASKED, False)


@triton.jit
def suffix_sums_left_of(p_head, s_head, start, bos, eos, live, BLOCK_N: tl.constexpr,
                         GATE_CHUNK: tl.constexpr, MASKED: tl.constexpr):
    """tile_suffix of the key tile [start - BLOCK_N, start), the next one a forward/dq program
    walks to, read only if live: the callers pass False after a program's last tile (a load
    whose value is never used would still have to land before the program could finish).
    MASKED also stops at eos; the start is clamped to the sequence start so that the address
    stays in bounds."""
    first = tl.maximum(start - BLOCK_N, bos)
    return tile_suffix(p_head, s_head, first + tl.arange(0, BLOCK_N), first, eos, live, BLOCK_N, GATE_CHUNK,
                        MASKED)


# How a tile applies the gate's decay L_t - L_j (base 2) to its logits.
NO_DECAY = tl.constexpr(0)
# Diagonal tiles: L_t - L_j formed per pair, exactly 0 on the diagonal.
PAIR_DECAY = tl.constexpr(1)
# Off-diagonal tiles: L_t - L_j = row_shift[t] + key_term[j]. The key term is added to the
# scores (it fuses with the scale multiply), the row term moves into the per-row constant
# that is subtracted anyway (running max or lse): no extra per-element work.
SPLIT_DECAY = tl.constexpr(2)



@triton.jit
def sequence_descriptor(base, stride_t, bos, eos, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """A tensor descriptor (Hopper TMA) over one head's rows [bos, eos) of a [tokens, heads, D]
    tensor: base points at the head's first element. Rows are addressed relative to bos, and a
    tile that reaches outside the sequence (negative rows, rows past eos, columns past
    HEAD_DIM) reads zeros, as the masked pointer loads do. The launcher (launch.py,
    descriptors_usable) checks the 16-byte alignment this needs."""
    return tl.make_tensor_descriptor(base + bos * stride_t, shape=[eos - bos, HEAD_DIM], strides=[stride_t, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_D])
