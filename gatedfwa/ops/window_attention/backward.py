"""Triton backward kernels of gated window attention (delta, dq, dk/dv, the gate gradient's
reverse sum), and their launcher. docs/math.md derives the gradients; tiles.py explains the
decay terms and the tile phases.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatedfwa.ops.common.head_major import batch_shift, head_row
from gatedfwa.ops.common.triton_support import LOG2E, dot_precision, token_and_head_strides
from gatedfwa.ops.common.varlen import query_bounds, sequence_bounds
from gatedfwa.ops.window_attention import launch
from gatedfwa.ops.window_attention.gate_flux import flux_tile_count, gate_gradient_from_flux
from gatedfwa.ops.window_attention.tiles import (
    NO_DECAY, PAIR_DECAY, SPLIT_DECAY, sequence_descriptor, tile_carry, tile_prefix, tile_suffix,
)
from gatedfwa.ops.window_attention.walk import walk_key_tiles

__all__ = ["attention_backward"]


@triton.jit
def _delta_kernel(
    O, DO, LSE, SUMS, DELTA, SHIFTED_LSE, CU_SEQLENS,
    stride_ot, stride_oh, stride_dot, stride_doh,
    seqlen, num_q_heads, CU_SEQLENS_K, seqlen_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_GATE: tl.constexpr, VARLEN: tl.constexpr, FEWER_QUERIES: tl.constexpr,
):
    """delta_t = sum_d o_t * do_t in float32, the softmax-backward row term; with a gate also
    lse2_t - P[t] (P the chunk prefix sum of chunk_sums.py), the query term the dk/dv kernel
    subtracts from its off-diagonal logits. Rows are q's (CU_SEQLENS, seqlen: q's); with
    FEWER_QUERIES, P is read at each query's key position (CU_SEQLENS_K, seqlen_k: k's)."""
    block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
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
        row = head_row(seq, head, num_q_heads) * seqlen + (offs_m - bos)
    tl.store(DELTA + row, delta, mask=row_ok)
    if HAS_GATE:
        lse2 = tl.load(LSE + row, mask=row_ok, other=0.0)
        sums_row = row
        if FEWER_QUERIES:
            # The gate sums follow k: queries end where their sequence's keys end.
            k_bos, k_eos = sequence_bounds(CU_SEQLENS_K, seq, seqlen_k, VARLEN)
            key = offs_m + (k_eos - eos)
            if VARLEN:
                sums_row = head * seqlen_k + key
            else:
                sums_row = head_row(seq, head, num_q_heads) * seqlen_k + (key - k_bos)
        prefix = tl.load(SUMS + sums_row, mask=row_ok, other=0.0)
        tl.store(SHIFTED_LSE + row, lse2 - prefix, mask=row_ok)


# The PTX of _store_warp_totals: s = the thread's two row sums, summed over the warp's eight
# quads (lanes differing in bits 2-4 hold other rows; the four lanes of a quad hold the same
# two rows), then stored by lane 0 at the first element's address. The outputs
# only copy the inputs: inline assembly must return a tensor.
_WARP_TOTAL_PTX = tl.constexpr("""
{
.reg .f32 s, t;
.reg .pred first;
.reg .u32 lane;
add.f32 s, $2, $3;
shfl.sync.bfly.b32 t, s, 4, 0x1f, -1;
add.f32 s, s, t;
shfl.sync.bfly.b32 t, s, 8, 0x1f, -1;
add.f32 s, s, t;
shfl.sync.bfly.b32 t, s, 16, 0x1f, -1;
add.f32 s, s, t;
mov.u32 lane, %laneid;
setp.eq.u32 first, lane, 0;
@first st.global.f32 [$4], s;
mov.b32 $0, $2;
mov.b32 $1, $3;
}
""")


@triton.jit
def _store_warp_totals(row_sums, pointers):
    """Store, per warp, the total of its rows of row_sums [BLOCK_M] float32 (in the matmul's
    row layout) at pointers [BLOCK_M] (the address of each row's warp slot), with no shared
    memory. tl.sum over the block goes on from the warps' totals to combine them through
    shared memory with two barriers, and Triton stores a row vector through shared memory
    too, once per key tile inside the dq loop (benchmarks/results/gate_gradient.md times
    both ways). Valid where every warp holds 16 whole rows, two per thread, each replicated
    over the four lanes of a quad: the layout of a Hopper tensor-core (wgmma) result with
    BLOCK_M == 16 * num_warps (launch.flux_parts decides;
    tests/ops/window_attention/test_gate_flux.py compares the parts' sums with one tl.sum per
    tile on a GPU)."""
    return tl.inline_asm_elementwise(
        asm=_WARP_TOTAL_PTX, constraints="=f,=f,f,f,l,l",
        args=[row_sums, pointers.to(tl.int64, bitcast=True)], dtype=tl.float32, is_pure=False, pack=2)


@triton.jit
def _dq_tile(
    state, rows, k_head, v_head, row_shift, key_term,
    offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DECAY: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr = False,
):
    """Add one key tile's contribution to dq (unscaled) and, with a gate, to the float32 row
    sums of dS, dgate_row [BLOCK_M] (a reduction inside each thread group of the matmul
    layout: no shared memory). The tile function of walk_key_tiles: state = (dq [BLOCK_M,
    BLOCK_D] float32, dgate_row, flux_tile: the count of tiles left of the diagonal seen so
    far), rows = (q, do [BLOCK_M, BLOCK_D], lse2, delta [BLOCK_M], flux_row, FLUX_PARTS).
    The decay is applied as in _forward_tile. With FLUX_PARTS > 0, each tile left of the
    diagonal also stores the sum of its dS (gate_flux.py): with FLUX_PARTS == 1 its total at
    flux_row + flux_tile, else (FLUX_PARTS = BLOCK_M / 16 = the warps) the total of each
    warp's 16 rows at flux_row + flux_tile * FLUX_PARTS + warp (_store_warp_totals)."""
    dq, dgate_row, flux_tile = state
    q, do, lse2, delta, flux_row, FLUX_PARTS = rows
    kv_mask = offs_d[:, None] < HEAD_DIM
    if MASKED:
        key_ok = (offs_n >= bos) & (offs_n < eos)
        kv_mask = kv_mask & key_ok[None, :]
    if USE_TMA:
        # (descriptor, start) pairs (walk.py); rows outside the sequence read as zeros.
        kT = tl.trans(k_head[0].load([k_head[1], 0]))
        vT = tl.trans(v_head[0].load([v_head[1], 0]))
    elif MASKED or not EVEN_D:
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
        row_sums = tl.sum(ds, 1)
        dgate_row += row_sums
        if DECAY == SPLIT_DECAY:
            # Every pair of this tile crosses the chunk boundaries between its keys and m0:
            # the tile's total is its share of their flux F(c).
            if FLUX_PARTS == 1:
                tl.store(flux_row + flux_tile, tl.sum(row_sums, 0))
            elif FLUX_PARTS > 1:
                warp = tl.arange(0, offs_m.shape[0]) // 16  # the warp that holds each row
                _store_warp_totals(row_sums, flux_row + flux_tile * FLUX_PARTS + warp)
            flux_tile += 1
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq, dgate_row, flux_tile


# window and flux_tiles only bound loops and comparisons (as in the forward kernel).
@triton.jit(do_not_specialize=["window", "flux_tiles"])
def _dq_kernel(
    Q, K, V, SUMS, DO, LSE, DELTA, DQ, DU, FLUX, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    sums_plane, stride_dot, stride_doh, stride_dqt, stride_dqh,
    seqlen, num_q_heads, window, qk_scale, scale, CU_SEQLENS_Q, seqlen_q, flux_tiles,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr,
    HAS_GATE: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, FEWER_QUERIES: tl.constexpr = False, FLUX_PARTS: tl.constexpr = 0,
):
    """One program: dq of BLOCK_M query rows of one head, walking key tiles as the forward
    (walk.py; USE_TMA as in the forward kernel); rows are key positions,
    and FEWER_QUERIES places the queries as in _forward_kernel. The row sums of dS go to dU,
    laid out like k (seqlen). FLUX_PARTS > 0: FLUX [sequences, HQ, query blocks, flux_tiles,
    FLUX_PARTS] float32 takes the dS total of each key tile left of the diagonal, nearest
    first, in FLUX_PARTS parts (_dq_tile; gate_flux.py; never with FEWER_QUERIES, whose blocks
    start at the first query). FLUX_PARTS == 0 compiles no flux code at all."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "BLOCK_M must be a multiple of BLOCK_N (the diagonal tiles)")
    tl.static_assert(BLOCK_N % GATE_CHUNK == 0, "every key tile must be whole gate chunks (launch.gate_chunk)")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must hold the head")
    block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    query_start, shift = query_bounds(CU_SEQLENS_Q, seq, seqlen_q, bos, eos, VARLEN, FEWER_QUERIES)
    m0 = bos + block * BLOCK_M
    stat_len = seqlen
    if FEWER_QUERIES:
        m0 += (query_start - bos) // BLOCK_M * BLOCK_M
        m0 = tl.where(query_start < eos, m0, eos)  # a sequence without queries: no program
        stat_len = seqlen_q
    if m0 >= eos:
        return
    kv_head = head // GROUP
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < eos
    q_rows = offs_m
    if FEWER_QUERIES:
        row_ok = row_ok & (offs_m >= query_start)
        q_rows = offs_m + shift
    qd_mask = row_ok[:, None]
    if not EVEN_D:
        qd_mask = qd_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + q_rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=qd_mask, other=0.0)
    if VARLEN:
        row_stat = head * stat_len + q_rows
    else:
        row_stat = head_row(seq, head, num_q_heads) * stat_len + (offs_m - query_start)
    du_row = row_stat
    if FEWER_QUERIES:
        if VARLEN:
            du_row = head * seqlen + offs_m
        else:
            du_row = head_row(seq, head, num_q_heads) * seqlen + (offs_m - bos)
    # Rows past the end load lse = 0 so that their (discarded) probabilities stay finite.
    lse2 = tl.load(LSE + row_stat, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_stat, mask=row_ok, other=0.0)
    p_head = SUMS + head * seqlen + batch_shift(seq, num_q_heads, seqlen, VARLEN)
    s_head = p_head + sums_plane
    query_offset = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GATE:
        query_offset, _ = tile_prefix(p_head, offs_m, m0, eos, True, BLOCK_M, GATE_CHUNK, True)
    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh
    if USE_TMA:
        k_head = sequence_descriptor(k_head, stride_kt, bos, eos, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_head = sequence_descriptor(v_head, stride_vt, bos, eos, HEAD_DIM, BLOCK_N, BLOCK_D)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dgate_row = tl.zeros([BLOCK_M], dtype=tl.float32)
    # The row of (seq, head), as head_row gives it, written out: through the helper ptxas
    # schedules this kernel differently (the same LLVM IR, another line table).
    flux_row = FLUX + ((seq * num_q_heads + head) * tl.num_programs(0) + block) * flux_tiles * FLUX_PARTS
    flux_tile = tl.zeros([BLOCK_M], dtype=tl.int32).sum(0)

    dq, dgate_row, flux_tile = walk_key_tiles(
        _dq_tile, (dq, dgate_row, flux_tile), (q, do, lse2, delta, flux_row, FLUX_PARTS), k_head, v_head, p_head, s_head, query_offset,
        offs_m, offs_d, m0, bos, eos, window, stride_kt, stride_vt, qk_scale,
        HEAD_DIM, EVEN_D, BLOCK_M, BLOCK_N, GATE_CHUNK, HAS_GATE, DOT_PRECISION, USE_TMA)

    tl.store(DQ + q_rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)
    if HAS_GATE:
        tl.store(DU + du_row, dgate_row, mask=row_ok)  # the row sums; dk/dv subtracts the columns


@triton.jit
def _dkdv_tile(
    dk, dv, dgate_col, k, v, key_term, q_head, do_head, p_head, lse_head, delta_head,
    running, m_start, offs_m, offs_n, offs_d, bos, eos, window,
    stride_qt, stride_dot, qk_scale, query_start,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DECAY: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr, FEWER_QUERIES: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    """Add one query tile's contribution to dk, dv (unscaled) and, with a gate, to the
    float32 column sums of dS, dgate_col [BLOCK_N] (the dq kernel takes the row sums).

    Works on the transposed scores sT [BLOCK_N keys, BLOCK_M queries] so that dk and dv
    accumulate with the key rows in place. The decay (see _dkdv_kernel for the offsets):
    PAIR_DECAY: key_term [BLOCK_N] is -L_j, L_t = running + the tile's prefix sums, lse_head
    holds lse2. SPLIT_DECAY: key_term is -L_j; L_t - L_j = (running + key_term[j]) + P_tile[t]
    and lse_head holds lse2 - P (_delta_kernel), so the query term needs no arithmetic when
    the tile is one gate chunk. Returns running advanced past this tile. With FEWER_QUERIES, the
    rows (key positions) before query_start hold no query and are masked.
    """
    row_ok = offs_m < eos
    if FEWER_QUERIES:
        row_ok = row_ok & (offs_m >= query_start)
    qT_mask = offs_d[:, None] < HEAD_DIM
    do_mask = offs_d[None, :] < HEAD_DIM
    if MASKED:
        qT_mask = qT_mask & row_ok[None, :]
        do_mask = do_mask & row_ok[:, None]
    if USE_TMA:
        # q_head, do_head: tensor descriptors of the sequence; rows past it read as zeros.
        qT = tl.trans(q_head.load([m_start - bos, 0]))
        do = do_head.load([m_start - bos, 0])
    elif MASKED or not EVEN_D:
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
        prefix, tile_sum = tile_prefix(p_head, offs_m, m_start, eos, True, BLOCK_M, GATE_CHUNK, MASKED)
        decayT = (running + prefix)[None, :] + key_term[:, None]
        if MASKED:
            decayT = tl.where(offs_m[None, :] == offs_n[:, None], 0.0, decayT)  # as in _forward_tile
        sT += decayT
        running += tile_sum
    elif DECAY == SPLIT_DECAY:
        carry, tile_sum = tile_carry(p_head, offs_m, m_start, eos, True, BLOCK_M, GATE_CHUNK, True)
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


@triton.jit(do_not_specialize=["window"])
def _dkdv_kernel(
    Q, K, V, SUMS, DO, LSE, SHIFTED_LSE, DELTA, DK, DV, DU, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    sums_plane, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    seqlen, num_q_heads, window, qk_scale, scale, CU_SEQLENS_Q, seqlen_q,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr,
    HAS_GATE: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, FEWER_QUERIES: tl.constexpr = False,
):
    """One program: dk, dv of BLOCK_N keys of one kv head, summed over its GROUP query heads;
    walks the query tiles that can see these keys, from the diagonal outward. Query tiles are
    counted in key positions; with FEWER_QUERIES the queries are the key positions [query_start, eos)
    (varlen.query_bounds) and q, do, lse, delta are read at key position + shift. USE_TMA loads
    q and do through tensor descriptors (launch.py chooses it; never with FEWER_QUERIES)."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "BLOCK_N must be a multiple of BLOCK_M (the diagonal tiles)")
    tl.static_assert(BLOCK_M % GATE_CHUNK == 0, "every query tile must be whole gate chunks (launch.gate_chunk)")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must hold the head")
    block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    query_start, shift = query_bounds(CU_SEQLENS_Q, seq, seqlen_q, bos, eos, VARLEN, FEWER_QUERIES)
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
    if FEWER_QUERIES:
        # Keys whose window ends before the first query: no query sees them, no tiles.
        num_tiles = tl.where(last_query > query_start, num_tiles, 0)
    num_diagonal = tl.minimum(tl.cdiv(BLOCK_N, BLOCK_M), num_tiles)
    num_unmasked = tl.minimum(window // BLOCK_M, (eos - n0) // BLOCK_M)
    num_unmasked = tl.maximum(tl.minimum(num_unmasked, num_tiles), num_diagonal)
    if FEWER_QUERIES:
        # A key block before the first query walks query tiles that hold key positions without
        # a query: all its tiles are masked (at most a window's worth of blocks per sequence).
        num_unmasked = tl.where(n0 < query_start, num_diagonal, num_unmasked)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for member in range(0, GROUP):
        head = kv_head * GROUP + member
        q_head = Q + head * stride_qh
        do_head = DO + head * stride_doh
        if USE_TMA:
            q_head = sequence_descriptor(q_head, stride_qt, bos, eos, HEAD_DIM, BLOCK_M, BLOCK_D)
            do_head = sequence_descriptor(do_head, stride_dot, bos, eos, HEAD_DIM, BLOCK_M, BLOCK_D)
        p_head = SUMS + head * seqlen + batch_shift(seq, num_q_heads, seqlen, VARLEN)
        if VARLEN:
            stat_offset = head * seqlen
        else:
            stat_offset = (seq * num_q_heads + head) * seqlen  # head_row written out, as flux_row in _dq_kernel
        query_stat_offset = stat_offset  # lse, delta: laid out like q
        if FEWER_QUERIES:
            q_head += shift * stride_qt
            do_head += shift * stride_dot
            if VARLEN:
                query_stat_offset = head * seqlen_q + shift
            else:
                query_stat_offset = head_row(seq, head, num_q_heads) * seqlen_q - (query_start - bos)
        delta_head = DELTA + query_stat_offset
        # Reference r = the key block's last position. L_j = -(g[j+1] + ... + g[r]) >= 0.
        # Diagonal query tiles lie inside the block: L_t = -(g[t+1] + ... + g[r]), walked
        # from -(block sum) upward. Later tiles: L_t = g[r+1] + ... + g[t] <= 0, from 0.
        key_term = tl.zeros([BLOCK_N], dtype=tl.float32)
        zero = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
        running = zero
        if HAS_GATE:
            suffix, block_sum = tile_suffix(p_head, p_head + sums_plane, offs_n, n0, eos, True, BLOCK_N,
                                             GATE_CHUNK, True)
            key_term = suffix  # -L_j
            running = -block_sum
        dgate_col = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, num_diagonal):
            m_start = n0 + i * BLOCK_M
            offs_m = m_start + tl.arange(0, BLOCK_M)
            dk, dv, dgate_col, running = _dkdv_tile(
                dk, dv, dgate_col, k, v, key_term, q_head, do_head, p_head, LSE + query_stat_offset,
                delta_head, running, m_start, offs_m, offs_n, offs_d, bos, eos, window, stride_qt,
                stride_dot, qk_scale, query_start, HEAD_DIM, EVEN_D, True, DIAGONAL, DOT_PRECISION, VARLEN,
                BLOCK_M, BLOCK_N, GATE_CHUNK, FEWER_QUERIES, USE_TMA)
        # Off-diagonal tiles read lse2 - P instead of lse2.
        if HAS_GATE:
            lse_head = SHIFTED_LSE + query_stat_offset
        else:
            lse_head = LSE + query_stat_offset
        running = zero
        for i in range(num_diagonal, num_unmasked):
            m_start = n0 + i * BLOCK_M
            offs_m = m_start + tl.arange(0, BLOCK_M)
            dk, dv, dgate_col, running = _dkdv_tile(
                dk, dv, dgate_col, k, v, key_term, q_head, do_head, p_head, lse_head, delta_head,
                running, m_start, offs_m, offs_n, offs_d, bos, eos, window, stride_qt, stride_dot,
                qk_scale, query_start, HEAD_DIM, EVEN_D, False, OFF_DIAGONAL, DOT_PRECISION, VARLEN,
                BLOCK_M, BLOCK_N, GATE_CHUNK, FEWER_QUERIES, USE_TMA)
        for i in range(num_unmasked, num_tiles):
            m_start = n0 + i * BLOCK_M
            offs_m = m_start + tl.arange(0, BLOCK_M)
            dk, dv, dgate_col, running = _dkdv_tile(
                dk, dv, dgate_col, k, v, key_term, q_head, do_head, p_head, lse_head, delta_head,
                running, m_start, offs_m, offs_n, offs_d, bos, eos, window, stride_qt, stride_dot,
                qk_scale, query_start, HEAD_DIM, EVEN_D, True, OFF_DIAGONAL, DOT_PRECISION, VARLEN,
                BLOCK_M, BLOCK_N, GATE_CHUNK, FEWER_QUERIES, USE_TMA)
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
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    if VARLEN:
        row = head * seqlen
    else:
        row = head_row(seq, head, num_q_heads) * seqlen - bos
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
    dg = launch.allocate_like(du)
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    if num_seqs == 0 or seqlen == 0:
        return dg
    program = launch.program_config("reverse_cumsum", du.device)
    _reverse_cumsum_kernel[(num_seqs, num_q_heads)](
        du, dg, du if cu_seqlens is None else cu_seqlens, seqlen, num_q_heads,
        BLOCK=program["BLOCK"], VARLEN=cu_seqlens is not None, num_warps=program["num_warps"],
    )
    return dg


def attention_backward(do, q, k, v, sums, o, lse, window_size, scale, cu_seqlens, cu_seqlens_q=None, dlse=None):
    """Gradients of o (and of the log-sum-exp) with respect to q, k, v and the log gates:
    (dq, dk, dv, dg) with dg [B,HQ,T_k] float32 (None without gate): the gates cover the key
    positions. sums and lse are what attention_forward used and returned (lse2 in base 2),
    cu_seqlens and cu_seqlens_q as there. dlse [B, HQ, T_q] float32 is the gradient flowing
    into the natural-log lse (None: the lse was not used)."""
    launch.check_sums(sums, q, k)
    problem = launch.Problem(q, k, window_size, cu_seqlens, cu_seqlens_q)
    dq = launch.allocate_like(q)
    dk = launch.allocate_like(k)
    dv = launch.allocate_like(v)
    has_gate = sums is not None
    stats_shape = (q.shape[0], problem.num_q_heads, q.shape[1])
    key_stats_shape = (k.shape[0], problem.num_q_heads, k.shape[1])
    if q.shape[1] == 0 or problem.max_seqlen == 0:
        for grad in (dq, dk, dv):
            grad.zero_()
        return dq, dk, dv, (q.new_zeros(key_stats_shape, dtype=torch.float32) if has_gate else None)
    gf = sums if has_gate else q
    delta = torch.empty(stats_shape, dtype=torch.float32, device=q.device)
    # dU = row sums of dS (dq kernel) - column sums (dk/dv kernel, after it), over key
    # positions; with fewer queries the dq kernel writes only the queries' positions.
    if not has_gate:
        du = delta
    elif problem.fewer_queries:
        du = torch.zeros(key_stats_shape, dtype=torch.float32, device=q.device)
    else:
        du = launch.allocate_like(delta)
    precision = dot_precision(q.dtype)
    common = dict(GROUP=problem.group, HEAD_DIM=problem.head_dim, BLOCK_D=problem.block_d,
                  GATE_CHUNK=launch.gate_chunk(problem.head_dim, q.device), HAS_GATE=has_gate, VARLEN=problem.varlen, DOT_PRECISION=precision,
                  FEWER_QUERIES=problem.fewer_queries)
    sums_plane = sums.stride(0) if has_gate else 0

    # lse2 - P, the dk/dv kernel's query term off the diagonal (only with a gate).
    shifted_lse = launch.allocate_like(delta) if has_gate else delta
    delta_block = launch.program_config("delta", q.device)["BLOCK"]
    _delta_kernel[problem.own_query_grid(delta_block, problem.num_q_heads)](
        o, do, lse, gf, delta, shifted_lse, problem.cu_seqlens_q,
        *token_and_head_strides(o), *token_and_head_strides(do), problem.seqlen_q, problem.num_q_heads,
        problem.cu_seqlens, problem.seqlen,
        HEAD_DIM=problem.head_dim, BLOCK_D=problem.block_d, BLOCK_M=delta_block, HAS_GATE=has_gate,
        VARLEN=problem.varlen, FEWER_QUERIES=problem.fewer_queries,
    )
    if dlse is not None:
        # lse_t = log sum_j exp(s_tj) has d lse_t / d s_tj = p_tj, so a gradient into lse adds
        # dlse_t * p_tj to dS_tj = p_tj (dp_tj - delta_t): the kernels' dS with delta_t - dlse_t.
        # Every consumer of dS (dq, dk, the gate fluxes) then includes it.
        delta.sub_(dlse.reshape(stats_shape).to(torch.float32))
    config = launch.usable_config(launch.kernel_config("dq", problem.head_dim, has_gate, q.device), q, k, v,
                                  fewer_queries=problem.fewer_queries)
    dq_grid = problem.query_grid(config["BLOCK_M"], problem.num_q_heads)
    # The dS total per query block and key tile, for dg from chunk-boundary fluxes (gate_flux.py).
    # With fewer queries than keys the blocks start at the first query: dg takes the reverse sum.
    flux_tiles = 0
    if has_gate and not problem.fewer_queries:
        flux_tiles = flux_tile_count(problem.window, config["BLOCK_M"], config["BLOCK_N"])
    # Zeros: a program leaves the tiles it does not visit (and blocks past the end) unwritten.
    # Without fluxes du stands in as the (unused) pointer.
    flux = du
    parts = launch.flux_parts(config, q) if flux_tiles else 0
    if flux_tiles:
        flux = q.new_zeros((problem.num_seqs, problem.num_q_heads, dq_grid[0], flux_tiles * parts), dtype=torch.float32)
    _dq_kernel[dq_grid](
        q, k, v, gf, do, lse, delta, dq, du, flux, problem.cu_seqlens,
        *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v),
        sums_plane, *token_and_head_strides(do), *token_and_head_strides(dq),
        problem.seqlen, problem.num_q_heads, problem.window, scale * LOG2E, scale,
        problem.cu_seqlens_q, problem.seqlen_q, flux_tiles, FLUX_PARTS=parts, **common, **config,
    )
    dq_blocks = (config["BLOCK_M"], config["BLOCK_N"])
    config = launch.usable_config(launch.kernel_config("dkdv", problem.head_dim, has_gate, q.device), q, do,
                                  fewer_queries=problem.fewer_queries)
    _dkdv_kernel[problem.grid(config["BLOCK_N"], problem.num_kv_heads)](
        q, k, v, gf, do, lse, shifted_lse, delta, dk, dv, du, problem.cu_seqlens,
        *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v),
        sums_plane, *token_and_head_strides(do),
        *token_and_head_strides(dk), *token_and_head_strides(dv),
        problem.seqlen, problem.num_q_heads, problem.window, scale * LOG2E, scale,
        problem.cu_seqlens_q, problem.seqlen_q, **common, **config,
    )
    dg = None
    if flux_tiles:
        dg = gate_gradient_from_flux(du, flux, cu_seqlens, *dq_blocks, parts=parts)
    elif has_gate:  # fewer queries, or windows too long for the flux buffer: one reverse sum per sequence
        dg = _reverse_cumsum_within_sequences(du, cu_seqlens)
    return dq, dk, dv, dg
