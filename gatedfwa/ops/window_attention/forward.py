"""Triton forward kernel of gated window attention, and its launcher.

One program owns BLOCK_M query rows of one sequence and one query head and walks key tiles
outward from the diagonal (tiles.py explains the decay terms and the tile phases).

On Hopper GPUs, GATEDFWA_HOPPER_KERNELS=gluon (gatedfwa/environment.py) hands the calls that
the warp-specialised Gluon kernel supports (gluon_forward.py) to it instead; it writes the same
o and lse2, which the Triton backward reads either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatedfwa.environment import hopper_kernels
from gatedfwa.ops.common.head_major import batch_shift, head_row
from gatedfwa.ops.common.online_softmax import softmax_lse, softmax_output
from gatedfwa.ops.common.triton_support import LOG2E, dot_precision, interpreting, token_and_head_strides
from gatedfwa.ops.common.varlen import query_bounds, sequence_bounds
from gatedfwa.ops.window_attention import launch
from gatedfwa.ops.window_attention.tiles import PAIR_DECAY, SPLIT_DECAY, sequence_descriptor, tile_prefix
from gatedfwa.ops.window_attention.walk import walk_key_tiles

__all__ = ["attention_forward"]


@triton.jit
def _forward_tile(
    state, rows, k_head, v_head, row_shift, key_term,
    offs_m, offs_n, offs_d, bos, eos, window,
    stride_kt, stride_vt, qk_scale,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DECAY: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr = False,
):
    """Fold one key tile into the running softmax of a query block (the tile function of
    walk_key_tiles): state = (acc [BLOCK_M, BLOCK_D] float32, row_max, row_sum [BLOCK_M]),
    rows = (q,).

    Logits are in base-2 units (multiplied by log2(e) once), so exp2 applies. With a decay,
    the logit of (t, j) is s_tj + row_shift[t] + key_term[j]: row_shift [BLOCK_M], key_term
    [BLOCK_N] (unused with NO_DECAY). row_max tracks the maximum of the full logits.
    """
    acc, row_max, row_sum = state
    q = rows[0]
    if MASKED:
        key_ok = (offs_n >= bos) & (offs_n < eos)
    if USE_TMA:
        # (descriptor, start) pairs (walk.py); rows outside the sequence read as zeros.
        k = tl.trans(k_head[0].load([k_head[1], 0]))
    elif MASKED:
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
    # The online softmax of common/online_softmax.py (softmax_step), with the decay's row term
    # off the diagonal folded into the running maximum (tiles.py). Written out here: a call
    # from this function would change the compiled kernel (the MLIR inliner then
    # canonicalizes it before it is inlined, which reorders its constants).
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
    if USE_TMA:
        v = v_head[0].load([v_head[1], 0])
    elif MASKED:
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


# The window only bounds comparisons: specialising on its value (== 1, divisible by 16) would
# compile a variant per kind of window and change no instruction at the benchmark shapes.
@triton.jit(do_not_specialize=["window"])
def _forward_kernel(
    Q, K, V, SUMS, O, LSE, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, sums_plane,
    seqlen, num_q_heads, window, qk_scale, CU_SEQLENS_Q, seqlen_q,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr,
    HAS_GATE: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, FEWER_QUERIES: tl.constexpr = False,
):
    """One program: BLOCK_M query rows of one sequence and one query head. Rows are key
    positions [m0, m0 + BLOCK_M) (seqlen, CU_SEQLENS: k's); with FEWER_QUERIES the sequence's
    queries are its last key positions [query_start, eos) (varlen.query_bounds), q/o/lse
    rows are key position + shift, and the blocks start at the block holding query_start.
    USE_TMA loads keys and values through tensor descriptors (walk.py; launch.py chooses it)."""
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
        row_ok = row_ok & (offs_m >= query_start)  # key positions before the queries: no rows
        q_rows = offs_m + shift
    q_mask = row_ok[:, None]
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)

    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh
    if USE_TMA:
        k_head = sequence_descriptor(k_head, stride_kt, bos, eos, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_head = sequence_descriptor(v_head, stride_vt, bos, eos, HEAD_DIM, BLOCK_N, BLOCK_D)
    p_head = SUMS + head * seqlen + batch_shift(seq, num_q_heads, seqlen, VARLEN)
    s_head = p_head + sums_plane

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    query_offset = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GATE:
        # L_t = g[m0] + ... + g[t] (reference r = m0 - 1).
        query_offset, _ = tile_prefix(p_head, offs_m, m0, eos, True, BLOCK_M, GATE_CHUNK, True)

    acc, row_max, row_sum = walk_key_tiles(
        _forward_tile, (acc, row_max, row_sum), (q,), k_head, v_head, p_head, s_head, query_offset,
        offs_m, offs_d, m0, bos, eos, window, stride_kt, stride_vt, qk_scale,
        HEAD_DIM, EVEN_D, BLOCK_M, BLOCK_N, GATE_CHUNK, HAS_GATE, DOT_PRECISION, USE_TMA)

    # Epilogue: normalise; rows without any visible key give 0 and lse = -inf.
    out = softmax_output(acc, row_sum)
    o_mask = row_ok[:, None]
    if not EVEN_D:
        o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(O + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=o_mask)
    lse = softmax_lse(row_max, row_sum)
    if VARLEN:
        lse_row = LSE + head * stat_len + q_rows
    else:
        lse_row = LSE + head_row(seq, head, num_q_heads) * stat_len + (offs_m - query_start)
    tl.store(lse_row, lse, mask=row_ok)



def _gluon_serves(q, k, v, sums, cu_seqlens, cu_seqlens_q) -> bool:
    """Whether the Gluon kernel (gluon_forward.py) takes this call: asked for with
    GATEDFWA_HOPPER_KERNELS=gluon, compiled (not under the interpreter), available in the
    installed Triton, and the call one it supports (Hopper GPU, fp16/bf16, D 64 or 128, no
    packed sequences, as many queries as keys)."""
    if hopper_kernels() != "gluon" or interpreting() or not q.is_cuda:
        return False
    try:
        from gatedfwa.ops.window_attention import gluon_forward
    except ImportError:  # a Triton without triton.experimental.gluon's Hopper support
        return False
    return gluon_forward.supports(q, k, v, sums, cu_seqlens, cu_seqlens_q, launch.gate_chunk(q.shape[-1], q.device))


def attention_forward(q, k, v, sums, window_size, scale, cu_seqlens, cu_seqlens_q=None):
    """q [B,T_q,HQ,D], k/v [B,T_k,H,D] contiguous (T_q <= T_k, queries aligned to the last
    keys); sums [2,B,HQ,T_k] float32, the chunk gate sums of chunk_sums.py at chunk length
    launch.gate_chunk(D, device), or None without gate. cu_seqlens delimits k's sequences, cu_seqlens_q
    q's (None: as k's). Returns o [B,T_q,HQ,D] (q's dtype) and the base-2 log-sum-exp lse2
    [B,HQ,T_q] float32."""
    launch.check_sums(sums, q, k)
    problem = launch.Problem(q, k, window_size, cu_seqlens, cu_seqlens_q)
    o = launch.allocate_like(q)
    lse = launch.allocate_like(q.new_empty((q.shape[0], problem.num_q_heads, q.shape[1]), dtype=torch.float32))
    if q.shape[1] == 0 or problem.max_seqlen == 0:
        lse.fill_(float("-inf"))
        o.zero_()
        return o, lse
    if _gluon_serves(q, k, v, sums, cu_seqlens, cu_seqlens_q):
        from gatedfwa.ops.window_attention.gluon_forward import gluon_attention_forward

        gluon_attention_forward(q, k, v, sums, problem.window, scale, launch.gate_chunk(problem.head_dim, q.device),
                                o, lse)
        return o, lse
    config = launch.usable_config(launch.kernel_config("forward", problem.head_dim, sums is not None, q.device), q, k, v,
                                  fewer_queries=problem.fewer_queries)
    _forward_kernel[problem.query_grid(config["BLOCK_M"], problem.num_q_heads)](
        q, k, v, sums if sums is not None else q, o, lse, problem.cu_seqlens,
        *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v),
        *token_and_head_strides(o), sums.stride(0) if sums is not None else 0,
        problem.seqlen, problem.num_q_heads, problem.window, scale * LOG2E, problem.cu_seqlens_q, problem.seqlen_q,
        GROUP=problem.group, HEAD_DIM=problem.head_dim, BLOCK_D=problem.block_d,
        GATE_CHUNK=launch.gate_chunk(problem.head_dim, q.device), HAS_GATE=sums is not None, VARLEN=problem.varlen, DOT_PRECISION=dot_precision(q.dtype),
        FEWER_QUERIES=problem.fewer_queries,
        **config,
    )
    return o, lse

