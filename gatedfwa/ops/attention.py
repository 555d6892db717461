"""Triton kernels for gated sliding-window attention: forward, and backward (dq, dk, dv, dg).

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
the chunk-local gate sums of gate_sums.py (inclusive prefix P and exclusive suffix S inside
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
Forward and dq programs walk key tiles in two phases: the tiles on the diagonal (causal
mask), then the tiles to the left, nearest first. Tiles wholly inside every row's window are
processed without any mask; only the diagonal tiles and the tiles at the far edge of the
window are masked. Tiles outside the window are never loaded. The dk/dv program mirrors this
over query tiles.

The gate gradient: d loss / d U_t = rowsum_j dS_tj - colsum_i dS_it, and
dg_s = sum_{t >= s} dU_t, a reverse cumulative sum inside each sequence (run in float64).
It equals the sum of dS over the pairs (t, j) with j < s <= t, a local quantity, but the
reverse sum only telescopes to it if the row and column sums agree to float32 rounding: both
are float32 sums of the float32 dS (rows in the dq kernel, columns in the dk/dv kernel, each
a reduction inside the matmul layout's thread groups, no atomics). The dq kernel writes the
row sums to dU, and the dk/dv kernel, which runs after it, subtracts its column sums there.
tests/ops/test_attention.py checks that dg's error does not grow towards the sequence start.

Layouts: q/o [B*T, HQ, D], k/v [B*T, H, D] (the caller's [B, T, ., D] flattened), gate sums
[2, B, HQ, T] float32 (contiguous along time), lse/delta/lse2 - P/dU [B, HQ, T]
float32. With cu_seqlens, B == 1.
The kernels keep the log-sum-exp in base 2 (lse2 = lse * log2(e)): the forward writes it and
the backward reads it without converting back and forth.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from gatedfwa.ops.gate_sums import longest_sequence
from gatedfwa.ops.triton_support import cdiv, next_power_of_2

LOG2E_HOST = 1.4426950408889634


# Triton decides at decoration time whether its kernels are interpreted; read it once too.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    return _INTERPRETING


# ======================================================================================
# Forward
# ======================================================================================


@triton.jit
def _sequence_bounds(cu_seqlens, seq, seqlen, VARLEN: tl.constexpr):
    """[bos, eos) of sequence `seq` in the flattened token axis."""
    if VARLEN:
        bos = tl.load(cu_seqlens + seq).to(tl.int32)
        eos = tl.load(cu_seqlens + seq + 1).to(tl.int32)
    else:
        bos = seq * seqlen
        eos = bos + seqlen
    return bos, eos


@triton.jit
def _gate_batch_shift(seq, num_q_heads, seqlen, VARLEN: tl.constexpr):
    """Gates are stored [B, HQ, T] (contiguous along time, so tiles load them in one
    stretch) but indexed by the flattened token p = b * T + t: batch b's head h starts
    (HQ - 1) * T * b further than p alone says."""
    if VARLEN:
        return 0
    else:
        return seq * (num_q_heads - 1) * seqlen


@triton.jit
def _chunk_total(p_head, chunk_start, eos, live, CHUNK: tl.constexpr):
    """Sum of the gates of the chunk that starts at chunk_start (0 past the sequence end, or
    when not live): the chunk's inclusive prefix sum at its last valid position."""
    last = tl.minimum(chunk_start + CHUNK - 1, eos - 1)
    return tl.load(p_head + last, mask=(chunk_start < eos) & live, other=0.0)


@triton.jit
def _tile_carry(p_head, offs, start, eos, live, TILE: tl.constexpr, CHUNK: tl.constexpr, BEFORE: tl.constexpr):
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
    carry, total = _tile_carry(p_head, offs, start, eos, live, TILE, CHUNK, PREFIX)
    if TILE > CHUNK:
        sums += carry
    return sums, total


@triton.jit
def _tile_prefix(p_head, offs, start, eos, live, TILE: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr):
    """Inclusive prefix sums of the gates inside the tile [start, start + TILE) and the tile's
    total: P[t] plus the totals of the tile's chunks before t's, all terms of one sign."""
    return _tile_sums(p_head, p_head, offs, start, eos, live, TILE, CHUNK, MASKED, True)


@triton.jit
def _tile_suffix(p_head, s_head, offs, start, eos, live, TILE: tl.constexpr, CHUNK: tl.constexpr,
                 MASKED: tl.constexpr):
    """Exclusive suffix sums g[j+1] + ... + g[tile end] inside the tile [start, start + TILE)
    and the tile's total: S[j] plus the totals of the tile's chunks after j's."""
    return _tile_sums(s_head, p_head, offs, start, eos, live, TILE, CHUNK, MASKED, False)


@triton.jit
def _suffix_sums_left_of(p_head, s_head, start, bos, eos, live, BLOCK_N: tl.constexpr,
                         GATE_CHUNK: tl.constexpr, MASKED: tl.constexpr):
    """_tile_suffix of the key tile [start - BLOCK_N, start), the next one a forward/dq program
    walks to, read only if live: the callers pass False after a program's last tile (a load
    whose value is never used would still have to land before the program could finish).
    MASKED also stops at eos; the start is clamped to the sequence start so that the address
    stays in bounds."""
    first = tl.maximum(start - BLOCK_N, bos)
    return _tile_suffix(p_head, s_head, first + tl.arange(0, BLOCK_N), first, eos, live, BLOCK_N, GATE_CHUNK,
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
def _forward_tile(
    acc, row_max, row_sum,
    q, k_head, v_head, row_shift, key_term,
    offs_m, offs_n, offs_d, bos, eos, window,
    stride_kt, stride_vt, qk_scale,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DECAY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold one key tile into the running softmax of a query block.

    Logits are in base-2 units (multiplied by log2(e) once), so exp2 applies. With a decay,
    the logit of (t, j) is s_tj + row_shift[t] + key_term[j]: row_shift [BLOCK_M], key_term
    [BLOCK_N] (unused with NO_DECAY). row_max tracks the maximum of the full logits.
    """
    if MASKED:
        key_ok = (offs_n >= bos) & (offs_n < eos)
        k_mask = key_ok[None, :]
        if not EVEN_D:
            k_mask = k_mask & (offs_d[:, None] < HEAD_DIM)
        k = tl.load(k_head + offs_n[None, :] * stride_kt + offs_d[:, None], mask=k_mask, other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_head + offs_n[None, :] * stride_kt + offs_d[:, None])
        else:
            k = tl.load(k_head + offs_n[None, :] * stride_kt + offs_d[:, None],
                        mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        distance = offs_m[:, None] - offs_n[None, :]
    if DECAY == PAIR_DECAY:
        decay = row_shift[:, None] + key_term[None, :]
        if MASKED:
            # A key's decay to itself is exactly 0; the two offsets, summed in different
            # orders, may differ by a rounding of |L|.
            decay = tl.where(distance == 0, 0.0, decay)
        s += decay
    elif DECAY == SPLIT_DECAY:
        s += key_term[None, :]
    if MASKED:
        visible = (distance >= 0) & (distance < window) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    tile_max = tl.max(s, 1)
    if DECAY == SPLIT_DECAY:
        tile_max += row_shift
    new_max = tl.maximum(row_max, tile_max)
    # A row that has seen no visible key yet keeps max = -inf; subtract 0 instead so that
    # exp2(-inf - 0) = 0 rather than NaN.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    if DECAY == SPLIT_DECAY:
        p = tl.math.exp2(s - (safe_max - row_shift)[:, None])
    else:
        p = tl.math.exp2(s - safe_max[:, None])
    correction = tl.math.exp2(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None]
    if MASKED:
        v_mask = key_ok[:, None]
        if not EVEN_D:
            v_mask = v_mask & (offs_d[None, :] < HEAD_DIM)
        v = tl.load(v_head + offs_n[:, None] * stride_vt + offs_d[None, :], mask=v_mask, other=0.0)
    else:
        if EVEN_D:
            v = tl.load(v_head + offs_n[:, None] * stride_vt + offs_d[None, :])
        else:
            v = tl.load(v_head + offs_n[:, None] * stride_vt + offs_d[None, :],
                        mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _forward_kernel(
    Q, K, V, SUMS, O, LSE, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, sums_plane,
    seqlen, num_q_heads, window, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr,
    HAS_GATE: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one sequence and one query head."""
    block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    bos, eos = _sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    m0 = bos + block * BLOCK_M
    if m0 >= eos:
        return
    kv_head = head // GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    DIAGONAL: tl.constexpr = PAIR_DECAY if HAS_GATE else NO_DECAY
    OFF_DIAGONAL: tl.constexpr = SPLIT_DECAY if HAS_GATE else NO_DECAY

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < eos
    q_mask = row_ok[:, None]
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)

    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh
    p_head = SUMS + head * seqlen + _gate_batch_shift(seq, num_q_heads, seqlen, VARLEN)
    s_head = p_head + sums_plane

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    query_offset = tl.zeros([BLOCK_M], dtype=tl.float32)
    key_term = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GATE:
        # L_t = g[m0] + ... + g[t] (reference r = m0 - 1).
        query_offset, _ = _tile_prefix(p_head, offs_m, m0, eos, True, BLOCK_M, GATE_CHUNK, True)

    # Phase 1: the diagonal tiles [m0, m0 + BLOCK_M), left to right. L_j = g[m0] + ... + g[j].
    # The first tile's sums are read here, next to q: read at the top of the loop, they would
    # be staged through shared memory by the loop's pipelining for a single use (3% of the
    # forward at w = 512, H200). Further tiles (BLOCK_M > BLOCK_N) read theirs after the
    # previous tile, as in phase 2.
    diagonal_end = tl.minimum(m0 + BLOCK_M, eos)
    running = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
    prefix = key_term
    tile_sum = running
    if HAS_GATE:
        prefix, tile_sum = _tile_prefix(p_head, m0 + tl.arange(0, BLOCK_N), m0, eos, True, BLOCK_N, GATE_CHUNK, True)
    for n0 in range(m0, diagonal_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HAS_GATE:
            key_term = -(running + prefix)
            running += tile_sum
        acc, row_max, row_sum = _forward_tile(
            acc, row_max, row_sum, q, k_head, v_head, query_offset, key_term,
            offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
            HEAD_DIM, EVEN_D, True, DIAGONAL, DOT_PRECISION)
        if HAS_GATE:
            if BLOCK_M > BLOCK_N:
                prefix, tile_sum = _tile_prefix(p_head, offs_n + BLOCK_N, n0 + BLOCK_N, eos,
                                                n0 + BLOCK_N < diagonal_end, BLOCK_N, GATE_CHUNK, True)

    # Phase 2: tiles left of the diagonal, nearest first. For key tile [n0, n0 + BLOCK_N):
    # L_j = -(g[j+1] + ... + g[m0-1]) = running - S_tile[j], with running = -(gates in
    # [n0 + BLOCK_N, m0)), so L_t - L_j = (L_t - running) + S_tile[j]: a row term and the
    # suffix sums as loaded. Tiles whose keys are all >= bos and inside every row's window
    # need no mask.
    lowest_key = tl.maximum(bos, m0 - window + 1)
    num_tiles = tl.cdiv(m0 - lowest_key, BLOCK_N)
    unmasked_floor = tl.maximum(bos, m0 + BLOCK_M - window)
    num_unmasked = tl.minimum(tl.maximum(m0 - unmasked_floor, 0) // BLOCK_N, num_tiles)
    running = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
    row_shift = query_offset
    # Each tile loads the next tile's sums right after its own logits have used its sums:
    # their latency hides behind the rest of the tile and the next tile's q k^T, and the old
    # and new values are never live at once, so the loop carries them without register copies
    # (16 moves per tile when the load came first; kernel_instructions.py). The masked loop,
    # which holds the program's last tile, skips the load after it: a program would otherwise
    # end waiting on a load it never uses (2-3% of the forward at w = 512, H200). The unmasked
    # loop is followed by a masked tile except where the window reaches the sequence start, so
    # it skips no load and needs no predicate (its unused load stays in bounds: the address is
    # clamped to the sequence start). The first load is masked at the sequence end: in a
    # sequence's first block (m0 = bos) the phase has no tiles and a sequence shorter than a
    # tile ends inside [bos, bos + BLOCK_N).
    tile_sum = running
    if HAS_GATE:
        key_term, tile_sum = _suffix_sums_left_of(p_head, s_head, m0, bos, eos, m0 > lowest_key, BLOCK_N,
                                                  GATE_CHUNK, True)
    for i in range(0, num_unmasked):
        n0 = m0 - (i + 1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HAS_GATE:
            row_shift = query_offset - running
            running -= tile_sum
        acc, row_max, row_sum = _forward_tile(
            acc, row_max, row_sum, q, k_head, v_head, row_shift, key_term,
            offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
            HEAD_DIM, EVEN_D, False, OFF_DIAGONAL, DOT_PRECISION)
        if HAS_GATE:
            key_term, tile_sum = _suffix_sums_left_of(p_head, s_head, n0, bos, eos, True, BLOCK_N, GATE_CHUNK,
                                                      False)
    for i in range(num_unmasked, num_tiles):
        n0 = m0 - (i + 1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HAS_GATE:
            row_shift = query_offset - running
            running -= tile_sum
        acc, row_max, row_sum = _forward_tile(
            acc, row_max, row_sum, q, k_head, v_head, row_shift, key_term,
            offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
            HEAD_DIM, EVEN_D, True, OFF_DIAGONAL, DOT_PRECISION)
        if HAS_GATE:
            key_term, tile_sum = _suffix_sums_left_of(p_head, s_head, n0, bos, eos, n0 > lowest_key, BLOCK_N,
                                                      GATE_CHUNK, False)

    # Epilogue: normalise; rows without any visible key give 0 and lse = -inf.
    has_keys = row_sum > 0.0
    out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
    o_mask = row_ok[:, None]
    if not EVEN_D:
        o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(O + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=o_mask)
    lse = row_max + tl.math.log2(tl.where(has_keys, row_sum, 1.0))
    lse = tl.where(has_keys, lse, float("-inf"))
    if VARLEN:
        lse_row = LSE + head * seqlen + offs_m
    else:
        lse_row = LSE + (seq * num_q_heads + head) * seqlen + (offs_m - bos)
    tl.store(lse_row, lse, mask=row_ok)


# ======================================================================================
# Backward
# ======================================================================================


@triton.jit
def _delta_kernel(
    O, DO, LSE, SUMS, DELTA, SHIFTED_LSE, CU_SEQLENS,
    stride_ot, stride_oh, stride_dot, stride_doh,
    seqlen, num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_GATE: tl.constexpr, VARLEN: tl.constexpr,
):
    """delta_t = sum_d o_t * do_t in float32, the softmax-backward row term; with a gate also
    lse2_t - P[t] (P the chunk prefix sum of gate_sums.py), the query term the dk/dv kernel
    subtracts from its off-diagonal logits."""
    block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    bos, eos = _sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    m0 = bos + block * BLOCK_M
    if m0 >= eos:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < eos
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    # Row statistics and the prefix plane share the [B, HQ, T] layout.
    if VARLEN:
        row = head * seqlen + offs_m
    else:
        row = (seq * num_q_heads + head) * seqlen + (offs_m - bos)
    tl.store(DELTA + row, delta, mask=row_ok)
    if HAS_GATE:
        lse2 = tl.load(LSE + row, mask=row_ok, other=0.0)
        prefix = tl.load(SUMS + row, mask=row_ok, other=0.0)
        tl.store(SHIFTED_LSE + row, lse2 - prefix, mask=row_ok)


@triton.jit
def _dq_tile(
    dq, dgate_row, q, do, lse2, delta, k_head, v_head, row_shift, key_term,
    offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DECAY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add one key tile's contribution to dq (unscaled) and, with a gate, to the float32 row
    sums of dS, dgate_row [BLOCK_M] (a reduction inside each thread group of the matmul
    layout: no shared memory). The decay is applied as in _forward_tile."""
    kv_mask = offs_d[:, None] < HEAD_DIM
    if MASKED:
        key_ok = (offs_n >= bos) & (offs_n < eos)
        kv_mask = kv_mask & key_ok[None, :]
    if MASKED or not EVEN_D:
        kT = tl.load(k_head + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kv_mask, other=0.0)
        vT = tl.load(v_head + offs_n[None, :] * stride_vt + offs_d[:, None], mask=kv_mask, other=0.0)
    else:
        kT = tl.load(k_head + offs_n[None, :] * stride_kt + offs_d[:, None])
        vT = tl.load(v_head + offs_n[None, :] * stride_vt + offs_d[:, None])
    s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        distance = offs_m[:, None] - offs_n[None, :]
    if DECAY == PAIR_DECAY:
        decay = row_shift[:, None] + key_term[None, :]
        if MASKED:
            decay = tl.where(distance == 0, 0.0, decay)  # as in _forward_tile
        s += decay
    elif DECAY == SPLIT_DECAY:
        s += key_term[None, :]
    if MASKED:
        visible = (distance >= 0) & (distance < window) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    if DECAY == SPLIT_DECAY:
        p = tl.math.exp2(s - (lse2 - row_shift)[:, None])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if DECAY != NO_DECAY:
        dgate_row += tl.sum(ds, 1)
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq, dgate_row


@triton.jit
def _dq_kernel(
    Q, K, V, SUMS, DO, LSE, DELTA, DQ, DU, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    sums_plane, stride_dot, stride_doh, stride_dqt, stride_dqh,
    seqlen, num_q_heads, window, qk_scale, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr,
    HAS_GATE: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dq of BLOCK_M query rows of one head, walking key tiles as the forward."""
    block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    bos, eos = _sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    m0 = bos + block * BLOCK_M
    if m0 >= eos:
        return
    kv_head = head // GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    DIAGONAL: tl.constexpr = PAIR_DECAY if HAS_GATE else NO_DECAY
    OFF_DIAGONAL: tl.constexpr = SPLIT_DECAY if HAS_GATE else NO_DECAY

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < eos
    qd_mask = row_ok[:, None]
    if not EVEN_D:
        qd_mask = qd_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=qd_mask, other=0.0)
    if VARLEN:
        row_stat = head * seqlen + offs_m
    else:
        row_stat = (seq * num_q_heads + head) * seqlen + (offs_m - bos)
    # Rows past the end load lse = 0 so that their (discarded) probabilities stay finite.
    lse2 = tl.load(LSE + row_stat, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_stat, mask=row_ok, other=0.0)
    p_head = SUMS + head * seqlen + _gate_batch_shift(seq, num_q_heads, seqlen, VARLEN)
    s_head = p_head + sums_plane
    query_offset = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GATE:
        query_offset, _ = _tile_prefix(p_head, offs_m, m0, eos, True, BLOCK_M, GATE_CHUNK, True)
    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dgate_row = tl.zeros([BLOCK_M], dtype=tl.float32)
    key_term = tl.zeros([BLOCK_N], dtype=tl.float32)

    # The decay's row and key terms, and the order of their loads, as in _forward_kernel.
    diagonal_end = tl.minimum(m0 + BLOCK_M, eos)
    running = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
    prefix = key_term
    tile_sum = running
    if HAS_GATE:
        prefix, tile_sum = _tile_prefix(p_head, m0 + tl.arange(0, BLOCK_N), m0, eos, True, BLOCK_N, GATE_CHUNK, True)
    for n0 in range(m0, diagonal_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HAS_GATE:
            key_term = -(running + prefix)
            running += tile_sum
        dq, dgate_row = _dq_tile(
            dq, dgate_row, q, do, lse2, delta, k_head, v_head, query_offset, key_term,
            offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
            HEAD_DIM, EVEN_D, True, DIAGONAL, DOT_PRECISION)
        if HAS_GATE:
            if BLOCK_M > BLOCK_N:
                prefix, tile_sum = _tile_prefix(p_head, offs_n + BLOCK_N, n0 + BLOCK_N, eos,
                                                n0 + BLOCK_N < diagonal_end, BLOCK_N, GATE_CHUNK, True)

    lowest_key = tl.maximum(bos, m0 - window + 1)
    num_tiles = tl.cdiv(m0 - lowest_key, BLOCK_N)
    unmasked_floor = tl.maximum(bos, m0 + BLOCK_M - window)
    num_unmasked = tl.minimum(tl.maximum(m0 - unmasked_floor, 0) // BLOCK_N, num_tiles)
    running = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
    row_shift = query_offset
    # Each tile loads the next tile's sums after its own, as in _forward_kernel.
    tile_sum = running
    if HAS_GATE:
        key_term, tile_sum = _suffix_sums_left_of(p_head, s_head, m0, bos, eos, m0 > lowest_key, BLOCK_N,
                                                  GATE_CHUNK, True)
    for i in range(0, num_unmasked):
        n0 = m0 - (i + 1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HAS_GATE:
            row_shift = query_offset - running
            running -= tile_sum
        dq, dgate_row = _dq_tile(
            dq, dgate_row, q, do, lse2, delta, k_head, v_head, row_shift, key_term,
            offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
            HEAD_DIM, EVEN_D, False, OFF_DIAGONAL, DOT_PRECISION)
        if HAS_GATE:
            key_term, tile_sum = _suffix_sums_left_of(p_head, s_head, n0, bos, eos, True, BLOCK_N, GATE_CHUNK,
                                                      False)
    for i in range(num_unmasked, num_tiles):
        n0 = m0 - (i + 1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HAS_GATE:
            row_shift = query_offset - running
            running -= tile_sum
        dq, dgate_row = _dq_tile(
            dq, dgate_row, q, do, lse2, delta, k_head, v_head, row_shift, key_term,
            offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
            HEAD_DIM, EVEN_D, True, OFF_DIAGONAL, DOT_PRECISION)
        if HAS_GATE:
            key_term, tile_sum = _suffix_sums_left_of(p_head, s_head, n0, bos, eos, n0 > lowest_key, BLOCK_N,
                                                      GATE_CHUNK, False)

    tl.store(DQ + offs_m[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)
    if HAS_GATE:
        tl.store(DU + row_stat, dgate_row, mask=row_ok)  # the row sums; dk/dv subtracts the columns


@triton.jit
def _dkdv_tile(
    dk, dv, dgate_col, k, v, key_term, q_head, do_head, p_head, lse_head, delta_head,
    running, m_start, offs_m, offs_n, offs_d, bos, eos, window,
    stride_qt, stride_dot, qk_scale,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DECAY: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr,
):
    """Add one query tile's contribution to dk, dv (unscaled) and, with a gate, to the
    float32 column sums of dS, dgate_col [BLOCK_N] (the dq kernel takes the row sums).

    Works on the transposed scores sT [BLOCK_N keys, BLOCK_M queries] so that dk and dv
    accumulate with the key rows in place. The decay (see _dkdv_kernel for the offsets):
    PAIR_DECAY: key_term [BLOCK_N] is -L_j, L_t = running + the tile's prefix sums, lse_head
    holds lse2. SPLIT_DECAY: key_term is -L_j; L_t - L_j = (running + key_term[j]) + P_tile[t]
    and lse_head holds lse2 - P (_delta_kernel), so the query term needs no arithmetic when
    the tile is one gate chunk. Returns running advanced past this tile.
    """
    row_ok = offs_m < eos
    qT_mask = offs_d[:, None] < HEAD_DIM
    do_mask = offs_d[None, :] < HEAD_DIM
    if MASKED:
        qT_mask = qT_mask & row_ok[None, :]
        do_mask = do_mask & row_ok[:, None]
    if MASKED or not EVEN_D:
        qT = tl.load(q_head + offs_m[None, :] * stride_qt + offs_d[:, None], mask=qT_mask, other=0.0)
        do = tl.load(do_head + offs_m[:, None] * stride_dot + offs_d[None, :], mask=do_mask, other=0.0)
    else:
        qT = tl.load(q_head + offs_m[None, :] * stride_qt + offs_d[:, None])
        do = tl.load(do_head + offs_m[:, None] * stride_dot + offs_d[None, :])
    if VARLEN:
        stat = offs_m
    else:
        stat = offs_m - bos
    if MASKED:
        lse2 = tl.load(lse_head + stat, mask=row_ok, other=0.0)
        delta = tl.load(delta_head + stat, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(lse_head + stat)
        delta = tl.load(delta_head + stat)
    sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale
    if DECAY == PAIR_DECAY:
        prefix, tile_sum = _tile_prefix(p_head, offs_m, m_start, eos, True, BLOCK_M, GATE_CHUNK, MASKED)
        decayT = (running + prefix)[None, :] + key_term[:, None]
        if MASKED:
            decayT = tl.where(offs_m[None, :] == offs_n[:, None], 0.0, decayT)  # as in _forward_tile
        sT += decayT
        running += tile_sum
    elif DECAY == SPLIT_DECAY:
        carry, tile_sum = _tile_carry(p_head, offs_m, m_start, eos, True, BLOCK_M, GATE_CHUNK, True)
        sT += (running + key_term)[:, None]
        if BLOCK_M > GATE_CHUNK:
            lse2 -= carry
        running += tile_sum
    if MASKED:
        distance = offs_m[None, :] - offs_n[:, None]
        visible = (distance >= 0) & (distance < window) & row_ok[None, :]
        sT = tl.where(visible, sT, float("-inf"))
    pT = tl.math.exp2(sT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dsT_low = dsT.to(qT.dtype)
    if DECAY != NO_DECAY:
        dgate_col += tl.sum(dsT, 1)
    dk = tl.dot(dsT_low, tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv, dgate_col, running


@triton.jit
def _dkdv_kernel(
    Q, K, V, SUMS, DO, LSE, SHIFTED_LSE, DELTA, DK, DV, DU, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    sums_plane, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    seqlen, num_q_heads, window, qk_scale, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr,
    HAS_GATE: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dk, dv of BLOCK_N keys of one kv head, summed over its GROUP query heads;
    walks the query tiles that can see these keys, from the diagonal outward."""
    block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    bos, eos = _sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    n0 = bos + block * BLOCK_N
    if n0 >= eos:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    DIAGONAL: tl.constexpr = PAIR_DECAY if HAS_GATE else NO_DECAY
    OFF_DIAGONAL: tl.constexpr = SPLIT_DECAY if HAS_GATE else NO_DECAY

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < eos
    kd_mask = key_ok[:, None]
    if not EVEN_D:
        kd_mask = kd_mask & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + offs_n[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kd_mask, other=0.0)

    # Query tiles start at n0 (the diagonal). Tiles [0, num_diagonal) overlap the causal edge,
    # tiles [num_diagonal, num_unmasked) are wholly visible, the rest reach the window's edge
    # or the end of the sequence.
    last_query = tl.minimum(eos, n0 + BLOCK_N - 1 + window)  # exclusive
    num_tiles = tl.cdiv(last_query - n0, BLOCK_M)
    num_diagonal = tl.minimum(tl.cdiv(BLOCK_N, BLOCK_M), num_tiles)
    num_unmasked = tl.minimum(window // BLOCK_M, (eos - n0) // BLOCK_M)
    num_unmasked = tl.maximum(tl.minimum(num_unmasked, num_tiles), num_diagonal)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for member in range(0, GROUP):
        head = kv_head * GROUP + member
        q_head = Q + head * stride_qh
        do_head = DO + head * stride_doh
        p_head = SUMS + head * seqlen + _gate_batch_shift(seq, num_q_heads, seqlen, VARLEN)
        if VARLEN:
            stat_offset = head * seqlen
        else:
            stat_offset = (seq * num_q_heads + head) * seqlen
        delta_head = DELTA + stat_offset
        # Reference r = the key block's last position. L_j = -(g[j+1] + ... + g[r]) >= 0.
        # Diagonal query tiles lie inside the block: L_t = -(g[t+1] + ... + g[r]), walked
        # from -(block sum) upward. Later tiles: L_t = g[r+1] + ... + g[t] <= 0, from 0.
        key_term = tl.zeros([BLOCK_N], dtype=tl.float32)
        zero = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
        running = zero
        if HAS_GATE:
            suffix, block_sum = _tile_suffix(p_head, p_head + sums_plane, offs_n, n0, eos, True, BLOCK_N,
                                             GATE_CHUNK, True)
            key_term = suffix  # -L_j
            running = -block_sum
        dgate_col = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, num_diagonal):
            m_start = n0 + i * BLOCK_M
            offs_m = m_start + tl.arange(0, BLOCK_M)
            dk, dv, dgate_col, running = _dkdv_tile(
                dk, dv, dgate_col, k, v, key_term, q_head, do_head, p_head, LSE + stat_offset,
                delta_head, running, m_start, offs_m, offs_n, offs_d, bos, eos, window, stride_qt,
                stride_dot, qk_scale, HEAD_DIM, EVEN_D, True, DIAGONAL, DOT_PRECISION, VARLEN,
                BLOCK_M, BLOCK_N, GATE_CHUNK)
        # Off-diagonal tiles read lse2 - P instead of lse2.
        if HAS_GATE:
            lse_head = SHIFTED_LSE + stat_offset
        else:
            lse_head = LSE + stat_offset
        running = zero
        for i in range(num_diagonal, num_unmasked):
            m_start = n0 + i * BLOCK_M
            offs_m = m_start + tl.arange(0, BLOCK_M)
            dk, dv, dgate_col, running = _dkdv_tile(
                dk, dv, dgate_col, k, v, key_term, q_head, do_head, p_head, lse_head, delta_head,
                running, m_start, offs_m, offs_n, offs_d, bos, eos, window, stride_qt, stride_dot,
                qk_scale, HEAD_DIM, EVEN_D, False, OFF_DIAGONAL, DOT_PRECISION, VARLEN,
                BLOCK_M, BLOCK_N, GATE_CHUNK)
        for i in range(num_unmasked, num_tiles):
            m_start = n0 + i * BLOCK_M
            offs_m = m_start + tl.arange(0, BLOCK_M)
            dk, dv, dgate_col, running = _dkdv_tile(
                dk, dv, dgate_col, k, v, key_term, q_head, do_head, p_head, lse_head, delta_head,
                running, m_start, offs_m, offs_n, offs_d, bos, eos, window, stride_qt, stride_dot,
                qk_scale, HEAD_DIM, EVEN_D, True, OFF_DIAGONAL, DOT_PRECISION, VARLEN,
                BLOCK_M, BLOCK_N, GATE_CHUNK)
        if HAS_GATE:
            # dU = row sums (written by the dq kernel) - column sums, for these keys.
            if VARLEN:
                du = DU + stat_offset + offs_n
            else:
                du = DU + stat_offset + (offs_n - bos)
            tl.store(du, tl.load(du, mask=key_ok, other=0.0) - dgate_col, mask=key_ok)

    tl.store(DK + offs_n[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + offs_n[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_mask)


# ======================================================================================
# Launch configuration
# ======================================================================================


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


# Tile sizes: the fastest of benchmarks/bench_attention.py --only sweep on an H200
# (benchmarks/results/attention_sweep.md), B=4 T=8192 H=16, w = 512 and 2048.


def _forward_config(head_dim: int, has_gate: bool = True) -> dict:
    """Tile sizes for the forward kernel (BLOCK_M must be a multiple of BLOCK_N)."""
    if _interpreting():
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    block_d = _block_d(head_dim)
    if block_d <= 64 and has_gate:
        # With the gate, 128 x 64 needs more than 255 registers and spills; 64 x 32 fits in
        # ~120 and four programs share an SM (H200, B=4 T=8192 H=16 D=64 w=512: 0.33 ms
        # against 0.41 ms for 128 x 64 with the gate, 0.31 ms without it).
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def _dq_config(head_dim: int, has_gate: bool = True) -> dict:
    """Tile sizes for the dq kernel (BLOCK_M must be a multiple of BLOCK_N)."""
    if _interpreting():
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    block_d = _block_d(head_dim)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)


def _dkdv_config(head_dim: int, has_gate: bool = True) -> dict:
    """BLOCK_N keys held per program, BLOCK_M queries per tile (BLOCK_N a multiple of BLOCK_M)."""
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    block_d = _block_d(head_dim)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if block_d <= 128:
        # 32 x 64 w4 s3 measured the same within 1% (attention_sweep.md); 64 x 64 makes
        # every D <= 128 tile one gate chunk of 64 (gate_chunk).
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)


# Tests and benchmarks may replace these to try other tile sizes. Each takes (head_dim,
# has_gate); gate_chunk and the gated launches use has_gate=True.
CONFIGS = {"forward": _forward_config, "dq": _dq_config, "dkdv": _dkdv_config}


def gate_chunk(head_dim: int) -> int:
    """The chunk length of the gate sums (gate_sums.py) for this head size: the smallest tile
    side of the three kernels, so that every tile is a whole number of chunks (tile sides are
    powers of two)."""
    return _smallest_tile_side(head_dim, CONFIGS["forward"], CONFIGS["dq"], CONFIGS["dkdv"])


@functools.lru_cache(maxsize=None)
def _smallest_tile_side(head_dim: int, *config_functions) -> int:
    # Cached per set of config functions (every call of an op asks; a replaced CONFIGS entry
    # is a new key).
    configs = [config(head_dim) for config in config_functions]
    return min(min(config["BLOCK_M"], config["BLOCK_N"]) for config in configs)


class _Problem:
    """Sizes shared by every launch of one call, derived once."""

    def __init__(self, q, k, window_size, cu_seqlens):
        batch, seqlen, self.num_q_heads, self.head_dim = q.shape
        self.num_kv_heads = k.shape[2]
        self.group = self.num_q_heads // self.num_kv_heads
        self.block_d = _block_d(self.head_dim)
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.num_seqs = cu_seqlens.numel() - 1
            self.max_seqlen = longest_sequence(cu_seqlens, seqlen)
            self.cu_seqlens = cu_seqlens
        else:
            self.num_seqs = batch
            self.max_seqlen = seqlen
            self.cu_seqlens = q  # unused pointer placeholder
        self.seqlen = seqlen  # the packed length with cu_seqlens
        # A window at least as long as any sequence is full causal attention.
        limit = max(self.max_seqlen, 1)
        self.window = limit if window_size is None else min(window_size, limit)

    def grid(self, block: int, heads: int):
        return (cdiv(max(self.max_seqlen, 1), block), self.num_seqs, heads)


def _allocate_like(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised output buffer shaped like x. Tests replace this to fill outputs with NaN,
    which shows any element a kernel fails to write."""
    return torch.empty_like(x)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision products; tf32 would cost ~1e-3 relative error.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(x: torch.Tensor) -> tuple[int, int]:
    """(token stride, head stride) of a contiguous [B, T, H, D] tensor, for the kernels'
    flattened token index b * T + t. A contiguous tensor may carry any stride in a dimension
    of size 1, so with T == 1 the token stride is the batch stride."""
    return (x.stride(0) if x.shape[1] == 1 else x.stride(1)), x.stride(2)


def _check_sums(sums: torch.Tensor | None, q: torch.Tensor) -> None:
    expected = (2, q.shape[0], q.shape[2], q.shape[1])
    if sums is not None and (tuple(sums.shape) != expected or sums.dtype != torch.float32 or not sums.is_contiguous()):
        raise ValueError(f"gate sums must be contiguous float32 {list(expected)}, got {sums.dtype} {list(sums.shape)}")


def attention_forward(q, k, v, sums, window_size, scale, cu_seqlens):
    """q [B,T,HQ,D], k/v [B,T,H,D] contiguous; sums [2,B,HQ,T] float32, the chunk gate sums
    of gate_sums.py at chunk length gate_chunk(D), or None without gate.
    Returns o [B,T,HQ,D] (q's dtype) and the base-2 log-sum-exp lse2 [B,HQ,T] float32."""
    _check_sums(sums, q)
    problem = _Problem(q, k, window_size, cu_seqlens)
    o = _allocate_like(q)
    lse = _allocate_like(q.new_empty((q.shape[0], problem.num_q_heads, q.shape[1]), dtype=torch.float32))
    if q.shape[1] == 0 or problem.max_seqlen == 0:
        lse.fill_(float("-inf"))
        o.zero_()
        return o, lse
    config = CONFIGS["forward"](problem.head_dim, sums is not None)
    _forward_kernel[problem.grid(config["BLOCK_M"], problem.num_q_heads)](
        q, k, v, sums if sums is not None else q, o, lse, problem.cu_seqlens,
        *_strides(q), *_strides(k), *_strides(v),
        *_strides(o), sums.stride(0) if sums is not None else 0,
        problem.seqlen, problem.num_q_heads, problem.window, scale * LOG2E_HOST,
        GROUP=problem.group, HEAD_DIM=problem.head_dim, BLOCK_D=problem.block_d,
        GATE_CHUNK=gate_chunk(problem.head_dim), HAS_GATE=sums is not None, VARLEN=problem.varlen, DOT_PRECISION=_dot_precision(q.dtype),
        **config,
    )
    return o, lse


@triton.jit
def _reverse_cumsum_kernel(
    DU, DG, CU_SEQLENS, seqlen, num_q_heads,
    BLOCK: tl.constexpr, VARLEN: tl.constexpr,
):
    """dg_s = sum of dU_t over t >= s inside s's sequence, for one sequence and one head:
    dU [B, HQ, T] float32 in, dg float32 out, accumulated in float64. The program walks its
    row from the sequence end in blocks: each block's suffix sums plus the total of the
    blocks after it. dU's row and column sums cancel over long stretches, so the running
    total is summed in float64, where its rounding stays far below float32 dU's own."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    bos, eos = _sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    if VARLEN:
        row = head * seqlen
    else:
        row = (seq * num_q_heads + head) * seqlen - bos
    later = tl.zeros([BLOCK], dtype=tl.float64).sum(0)
    for i in range(0, tl.cdiv(eos - bos, BLOCK)):
        offs = eos - (i + 1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs >= bos
        du = tl.load(DU + row + offs, mask=inside, other=0.0).to(tl.float64)
        dg = tl.cumsum(du, 0, reverse=True) + later
        tl.store(DG + row + offs, dg.to(tl.float32), mask=inside)
        later += tl.sum(du, 0)


def _reverse_cumsum_within_sequences(du: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """du [B, HQ, T] float32 (B == 1 with cu_seqlens) -> dg [B, HQ, T] float32 with
    dg_s = sum of du_t over t >= s in s's sequence, summed in float64 in one launch."""
    batch, num_q_heads, seqlen = du.shape
    dg = _allocate_like(du)
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    if num_seqs == 0 or seqlen == 0:
        return dg
    block = 64 if _interpreting() else 2048
    _reverse_cumsum_kernel[(num_seqs, num_q_heads)](
        du, dg, du if cu_seqlens is None else cu_seqlens, seqlen, num_q_heads,
        BLOCK=block, VARLEN=cu_seqlens is not None, num_warps=1 if _interpreting() else 8,
    )
    return dg


def attention_backward(do, q, k, v, sums, o, lse, window_size, scale, cu_seqlens):
    """Gradients of o with respect to q, k, v and the log gates: (dq, dk, dv, dg) with
    dg [B,HQ,T] float32 (None without gate). sums and lse are what attention_forward used
    and returned (lse2 in base 2)."""
    _check_sums(sums, q)
    problem = _Problem(q, k, window_size, cu_seqlens)
    dq = _allocate_like(q)
    dk = _allocate_like(k)
    dv = _allocate_like(v)
    has_gate = sums is not None
    stats_shape = (q.shape[0], problem.num_q_heads, q.shape[1])
    if q.shape[1] == 0 or problem.max_seqlen == 0:
        for grad in (dq, dk, dv):
            grad.zero_()
        return dq, dk, dv, (q.new_zeros(stats_shape, dtype=torch.float32) if has_gate else None)
    gf = sums if has_gate else q
    delta = torch.empty(stats_shape, dtype=torch.float32, device=q.device)
    # dU = row sums of dS (dq kernel) - column sums (dk/dv kernel, after it).
    du = _allocate_like(delta) if has_gate else delta
    precision = _dot_precision(q.dtype)
    common = dict(GROUP=problem.group, HEAD_DIM=problem.head_dim, BLOCK_D=problem.block_d,
                  GATE_CHUNK=gate_chunk(problem.head_dim), HAS_GATE=has_gate, VARLEN=problem.varlen, DOT_PRECISION=precision)
    sums_plane = sums.stride(0) if has_gate else 0

    # lse2 - P, the dk/dv kernel's query term off the diagonal (only with a gate).
    shifted_lse = _allocate_like(delta) if has_gate else delta
    delta_block = 16 if _interpreting() else 64
    _delta_kernel[problem.grid(delta_block, problem.num_q_heads)](
        o, do, lse, gf, delta, shifted_lse, problem.cu_seqlens,
        *_strides(o), *_strides(do), problem.seqlen, problem.num_q_heads,
        HEAD_DIM=problem.head_dim, BLOCK_D=problem.block_d, BLOCK_M=delta_block, HAS_GATE=has_gate,
        VARLEN=problem.varlen,
    )
    config = CONFIGS["dq"](problem.head_dim, has_gate)
    _dq_kernel[problem.grid(config["BLOCK_M"], problem.num_q_heads)](
        q, k, v, gf, do, lse, delta, dq, du, problem.cu_seqlens,
        *_strides(q), *_strides(k), *_strides(v),
        sums_plane, *_strides(do), *_strides(dq),
        problem.seqlen, problem.num_q_heads, problem.window, scale * LOG2E_HOST, scale,
        **common, **config,
    )
    config = CONFIGS["dkdv"](problem.head_dim, has_gate)
    _dkdv_kernel[problem.grid(config["BLOCK_N"], problem.num_kv_heads)](
        q, k, v, gf, do, lse, shifted_lse, delta, dk, dv, du, problem.cu_seqlens,
        *_strides(q), *_strides(k), *_strides(v),
        sums_plane, *_strides(do),
        *_strides(dk), *_strides(dv),
        problem.seqlen, problem.num_q_heads, problem.window, scale * LOG2E_HOST, scale,
        **common, **config,
    )
    dg = None
    if has_gate:
        dg = _reverse_cumsum_within_sequences(du, cu_seqlens)
    return dq, dk, dv, dg
