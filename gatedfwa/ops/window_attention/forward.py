"""Triton forward kernel of gated window attention, and its launcher.

One program owns BLOCK_M query rows of one sequence and one query head and walks key tiles
outward from the diagonal (tiles.py explains the decay terms and the tile phases).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatedfwa.ops.triton_support import LOG2E, dot_precision, token_and_head_strides
from gatedfwa.ops.window_attention import launch
from gatedfwa.ops.window_attention.tiles import (
    NO_DECAY, PAIR_DECAY, SPLIT_DECAY, gate_batch_shift, sequence_bounds, suffix_sums_left_of, tile_prefix,
)

__all__ = ["attention_forward"]


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
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
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
    p_head = SUMS + head * seqlen + gate_batch_shift(seq, num_q_heads, seqlen, VARLEN)
    s_head = p_head + sums_plane

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    query_offset = tl.zeros([BLOCK_M], dtype=tl.float32)
    key_term = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GATE:
        # L_t = g[m0] + ... + g[t] (reference r = m0 - 1).
        query_offset, _ = tile_prefix(p_head, offs_m, m0, eos, True, BLOCK_M, GATE_CHUNK, True)

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
        prefix, tile_sum = tile_prefix(p_head, m0 + tl.arange(0, BLOCK_N), m0, eos, True, BLOCK_N, GATE_CHUNK, True)
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
                prefix, tile_sum = tile_prefix(p_head, offs_n + BLOCK_N, n0 + BLOCK_N, eos,
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
        key_term, tile_sum = suffix_sums_left_of(p_head, s_head, m0, bos, eos, m0 > lowest_key, BLOCK_N,
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
            key_term, tile_sum = suffix_sums_left_of(p_head, s_head, n0, bos, eos, True, BLOCK_N, GATE_CHUNK,
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
            key_term, tile_sum = suffix_sums_left_of(p_head, s_head, n0, bos, eos, n0 > lowest_key, BLOCK_N,
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



def attention_forward(q, k, v, sums, window_size, scale, cu_seqlens):
    """q [B,T,HQ,D], k/v [B,T,H,D] contiguous; sums [2,B,HQ,T] float32, the chunk gate sums
    of gate/chunk_sums.py at chunk length launch.gate_chunk(D), or None without gate.
    Returns o [B,T,HQ,D] (q's dtype) and the base-2 log-sum-exp lse2 [B,HQ,T] float32."""
    launch.check_sums(sums, q)
    problem = launch.Problem(q, k, window_size, cu_seqlens)
    o = launch.allocate_like(q)
    lse = launch.allocate_like(q.new_empty((q.shape[0], problem.num_q_heads, q.shape[1]), dtype=torch.float32))
    if q.shape[1] == 0 or problem.max_seqlen == 0:
        lse.fill_(float("-inf"))
        o.zero_()
        return o, lse
    config = launch.CONFIGS["forward"](problem.head_dim, sums is not None)
    _forward_kernel[problem.grid(config["BLOCK_M"], problem.num_q_heads)](
        q, k, v, sums if sums is not None else q, o, lse, problem.cu_seqlens,
        *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v),
        *token_and_head_strides(o), sums.stride(0) if sums is not None else 0,
        problem.seqlen, problem.num_q_heads, problem.window, scale * LOG2E,
        GROUP=problem.group, HEAD_DIM=problem.head_dim, BLOCK_D=problem.block_d,
        GATE_CHUNK=launch.gate_chunk(problem.head_dim), HAS_GATE=sums is not None, VARLEN=problem.varlen, DOT_PRECISION=dot_precision(q.dtype),
        **config,
    )
    return o, lse

