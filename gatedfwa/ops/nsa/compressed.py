"""Triton kernels of the compressed branch: attention over block summaries.

Query t of a sequence sees summary c once block c is complete: (c + 1) * block_size <= t + 1
(naive.py). A program holds the query heads of one kv head for BLOCK_Q consecutive
queries as ROWS = BLOCK_Q * GROUP_PAD rows (layout.py) and walks the summary tiles its last
query can see; the causal mask is per row (visible count (t + 1) // block_size). t is the
query's key position; with fewer queries than keys the queries are the last key positions
of each sequence and their rows are read and written at t + shift (layout.py).

    forward  o_cmp [B*T_q, HQ, D], lse2 [B*T_q, HQ] float32 (base 2; -inf: nothing visible)
    dq       per query tile, like the forward
    dk, dv   of the summaries, per tile of BLOCK_C summaries: walks the query tiles from the
             first query that sees the tile's first summary to the sequence end, in spans
             of key positions (launch.query_splits)

Work and memory are O(T * T / block_size) per head, as any dense attention over summaries.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.nsa import launch
from gatedfwa.ops.nsa.layout import SequenceLayout
from gatedfwa.ops.common.online_softmax import softmax_lse, softmax_output, softmax_step
from gatedfwa.ops.nsa.tiles import (
    check_tiles,
    load_gradient_rows,
    load_keys,
    load_rows,
    probabilities,
    query_rows,
    query_tile_rows,
    store_rows,
    summary_bounds,
)
from gatedfwa.ops.common.triton_support import LOG2E, cdiv, jit, tl, token_and_head_strides
from gatedfwa.ops.common.varlen import query_bounds, sequence_bounds

__all__ = ["compressed_forward", "compressed_backward"]


@jit
def _compressed_forward_kernel(
    Q, KC, VC, O, LSE, CU_SEQLENS, CU_SEQLENS_Q, SUMMARY_OFFSETS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    seqlen, seqlen_q, summaries_per_seq, num_q_heads, block_size, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FEWER_QUERIES: tl.constexpr,
):
    check_tiles(GROUP, GROUP_PAD, ROWS, BLOCK_C, HEAD_DIM, BLOCK_D)
    BLOCK_Q: tl.constexpr = ROWS // GROUP_PAD
    seq, kv_head, bos, eos, t0, position, row, head, valid, offs_d, q = query_tile_rows(
        Q, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, stride_qt, stride_qh, GROUP, GROUP_PAD, ROWS, HEAD_DIM,
        BLOCK_D, VARLEN, FEWER_QUERIES)
    if t0 >= eos:
        return
    first_summary, num_summaries = summary_bounds(SUMMARY_OFFSETS, seq, summaries_per_seq, VARLEN)
    visible = (position - bos + 1) // block_size  # summaries each row sees
    tile_visible = (tl.minimum(t0 + BLOCK_Q, eos) - bos) // block_size

    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([ROWS], dtype=tl.float32)
    for c0 in range(0, tile_visible, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < num_summaries
        k = load_keys(KC, first_summary + offs_c, c_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, True)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(offs_c[None, :] < visible[:, None], s, float("-inf"))
        v = load_keys(VC, first_summary + offs_c, c_ok, kv_head, offs_d, stride_vt, stride_vh, HEAD_DIM, False)
        acc, row_max, row_sum = softmax_step(acc, row_max, row_sum, s, v, DOT_PRECISION)
    out = softmax_output(acc, row_sum)
    lse = softmax_lse(row_max, row_sum)
    store_rows(O, out, row, head, valid, offs_d, stride_ot, stride_oh, HEAD_DIM)
    tl.store(LSE + row * num_q_heads + head, lse, mask=valid)


@jit
def _compressed_dq_kernel(
    Q, KC, VC, DO, LSE, DELTA, DQ, CU_SEQLENS, CU_SEQLENS_Q, SUMMARY_OFFSETS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    seqlen, seqlen_q, summaries_per_seq, num_q_heads, block_size, qk_scale, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FEWER_QUERIES: tl.constexpr,
):
    """dq_t = scale * sum_c P_tc (dP_tc - delta_t) k_cmp[c], dP = do . v_cmp."""
    check_tiles(GROUP, GROUP_PAD, ROWS, BLOCK_C, HEAD_DIM, BLOCK_D)
    BLOCK_Q: tl.constexpr = ROWS // GROUP_PAD
    seq, kv_head, bos, eos, t0, position, row, head, valid, offs_d, q = query_tile_rows(
        Q, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, stride_qt, stride_qh, GROUP, GROUP_PAD, ROWS, HEAD_DIM,
        BLOCK_D, VARLEN, FEWER_QUERIES)
    if t0 >= eos:
        return
    first_summary, num_summaries = summary_bounds(SUMMARY_OFFSETS, seq, summaries_per_seq, VARLEN)
    do, lse, delta = load_gradient_rows(DO, LSE, DELTA, row, head, valid, offs_d, stride_dot, stride_doh,
                                        num_q_heads, HEAD_DIM)
    visible = (position - bos + 1) // block_size
    tile_visible = (tl.minimum(t0 + BLOCK_Q, eos) - bos) // block_size

    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, tile_visible, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < num_summaries
        k = load_keys(KC, first_summary + offs_c, c_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, False)
        v = load_keys(VC, first_summary + offs_c, c_ok, kv_head, offs_d, stride_vt, stride_vh, HEAD_DIM, False)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(offs_c[None, :] < visible[:, None], s, float("-inf"))
        p = probabilities(s, lse)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    store_rows(DQ, dq * scale, row, head, valid, offs_d, stride_dqt, stride_dqh, HEAD_DIM)


# The span and the number of splits change from call to call (query_splits: with the lengths
# and the programs' count); they only bound the walk and divide the program id, so specialising
# on their values (== 1, divisible by 16) would compile variants for nothing.
@jit(do_not_specialize=["query_span", "num_splits"])
def _compressed_dkdv_kernel(
    Q, KC, VC, DO, LSE, DELTA, DKC, DVC, CU_SEQLENS, CU_SEQLENS_Q, SUMMARY_OFFSETS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    seqlen, seqlen_q, summaries_per_seq, num_q_heads, block_size, qk_scale, scale, query_span, num_splits,
    split_stride,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FEWER_QUERIES: tl.constexpr,
):
    """Gradients of BLOCK_C summaries of one kv head from the query rows of one span of
    query_span key positions (split s: [bos + s * query_span, ...), of which only the queries'
    positions hold rows): dv_c = sum_t P_tc do_t,
    dk_c = scale * sum_t dS_tc q_t. Each split writes its own float32 partial (DKC/DVC hold
    [splits, num_summaries, H, D], split s at offset s * split_stride); the host sums them.
    A split whose span holds no query that sees the tile writes zeros."""
    check_tiles(GROUP, GROUP_PAD, ROWS, BLOCK_C, HEAD_DIM, BLOCK_D)
    BLOCK_Q: tl.constexpr = ROWS // GROUP_PAD
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    query_start, shift = query_bounds(CU_SEQLENS_Q, seq, seqlen_q, bos, eos, VARLEN, FEWER_QUERIES)
    first_summary, num_summaries = summary_bounds(SUMMARY_OFFSETS, seq, summaries_per_seq, VARLEN)
    c0 = (tl.program_id(0) // num_splits) * BLOCK_C
    split = tl.program_id(0) % num_splits
    if c0 >= num_summaries:
        return
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_ok = offs_c < num_summaries
    offs_d = tl.arange(0, BLOCK_D)
    k = load_keys(KC, first_summary + offs_c, c_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, False)
    v = load_keys(VC, first_summary + offs_c, c_ok, kv_head, offs_d, stride_vt, stride_vh, HEAD_DIM, False)
    dk = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    # The first query that sees summary c0 (key positions; queries start at query_start).
    first_query = tl.maximum(bos + (c0 + 1) * block_size - 1, query_start)
    span_end = tl.minimum(eos, bos + (split + 1) * query_span)
    for t0 in range(tl.maximum(first_query, bos + split * query_span), span_end, BLOCK_Q):
        position, head, valid = query_rows(t0, span_end, kv_head, GROUP, GROUP_PAD, ROWS)
        row = position + shift
        q = load_rows(Q, row, head, valid, offs_d, stride_qt, stride_qh, HEAD_DIM)
        do, lse, delta = load_gradient_rows(DO, LSE, DELTA, row, head, valid, offs_d, stride_dot, stride_doh,
                                            num_q_heads, HEAD_DIM)
        visible = (position - bos + 1) // block_size
        seen = (offs_c[:, None] < visible[None, :]) & valid[None, :] & c_ok[:, None]
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_C, ROWS]
        p = tl.where(seen, tl.math.exp2(s - lse[None, :]), 0.0)
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[None, :])
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    rows = first_summary + offs_c
    mask = c_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(DKC + split * split_stride + rows[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             dk * scale, mask=mask)
    tl.store(DVC + split * split_stride + rows[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv, mask=mask)


def _sequence_pointers(layout: SequenceLayout, q: torch.Tensor):
    """(cu_seqlens, cu_seqlens_q, summary offsets) pointers; q stands in for those a call
    does not have (never read)."""
    return (*layout.sequence_pointers(q), (layout.summary_offsets if layout.varlen else q))


def _nonempty(x: torch.Tensor) -> torch.Tensor:
    """A summary tensor the kernels may take a pointer of: one zero row when there is none
    (a sequence shorter than a block); rows past the summary count are never read."""
    return x if x.shape[0] > 0 else x.new_zeros((1, *x.shape[1:]))


def compressed_forward(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, layout: SequenceLayout,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, HQ, D] contiguous, k_cmp/v_cmp [num_summaries, H, D] (pooling.py).
    Returns o_cmp [B, T, HQ, D] in q's dtype and lse2 [B*T, HQ] float32 (base 2)."""
    o = launch.allocate_like(q)
    lse = torch.empty((layout.batch * layout.seqlen_q, layout.num_q_heads), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o, lse
    k_cmp, v_cmp = _nonempty(k_cmp), _nonempty(v_cmp)
    config = launch.kernel_config("compressed", layout)
    pointers = _sequence_pointers(layout, q)
    _compressed_forward_kernel[layout.grid(config["ROWS"] // layout.group_pad)](
        q, k_cmp, v_cmp, o, lse, *pointers,
        *token_and_head_strides(q), k_cmp.stride(0), k_cmp.stride(1), v_cmp.stride(0), v_cmp.stride(1), *token_and_head_strides(o),
        layout.seqlen_k, layout.seqlen_q, layout.summaries_per_seq, layout.num_q_heads, layout.block_size,
        scale * LOG2E, **launch.kernel_flags(layout, q), FEWER_QUERIES=layout.fewer_queries, **config,
    )
    return o, lse


def compressed_backward(do, q, k_cmp, v_cmp, o, lse, layout: SequenceLayout, scale: float):
    """Gradients (dq [B, T, HQ, D], dk_cmp, dv_cmp [num_summaries, H, D]) in the inputs' dtypes,
    from the forward's o and lse2."""
    dq = launch.allocate_like(q)
    dk_cmp = launch.allocate_like(k_cmp)
    dv_cmp = launch.allocate_like(v_cmp)
    if q.numel() == 0:
        return dq, dk_cmp, dv_cmp
    delta = (o.float() * do.float()).sum(-1).reshape(-1, layout.num_q_heads)
    k_in, v_in = _nonempty(k_cmp), _nonempty(v_cmp)
    config = launch.kernel_config("compressed", layout)
    pointers = _sequence_pointers(layout, q)
    sizes = (layout.seqlen_k, layout.seqlen_q, layout.summaries_per_seq, layout.num_q_heads, layout.block_size,
             scale * LOG2E, scale)
    flags = dict(**launch.kernel_flags(layout, q), FEWER_QUERIES=layout.fewer_queries, **config)
    _compressed_dq_kernel[layout.grid(config["ROWS"] // layout.group_pad)](
        q, k_in, v_in, do, lse, delta, dq, *pointers,
        *token_and_head_strides(q), k_in.stride(0), k_in.stride(1), v_in.stride(0), v_in.stride(1), *token_and_head_strides(do),
        *token_and_head_strides(dq), *sizes, **flags,
    )
    if k_cmp.shape[0] > 0:
        tiles_per_seq = cdiv(max(layout.max_summaries, 1), config["BLOCK_C"])
        span, splits = launch.query_splits(layout, tiles_per_seq * layout.num_seqs * layout.num_kv_heads)
        # float32 partial sums, one per split of the queries (summed below: no atomics).
        dk_part = launch.allocate_like(k_cmp.new_empty((splits, *k_cmp.shape), dtype=torch.float32))
        dv_part = launch.allocate_like(dk_part)
        _compressed_dkdv_kernel[(tiles_per_seq * splits, layout.num_seqs, layout.num_kv_heads)](
            q, k_cmp, v_cmp, do, lse, delta, dk_part, dv_part, *pointers,
            *token_and_head_strides(q), k_cmp.stride(0), k_cmp.stride(1), v_cmp.stride(0), v_cmp.stride(1),
            *token_and_head_strides(do), dk_part.stride(1), dk_part.stride(2), dv_part.stride(1), dv_part.stride(2),
            *sizes, span, splits, dk_part.stride(0), **flags,
        )
        dk_cmp = dk_part.sum(0).to(k_cmp.dtype)
        dv_cmp = dv_part.sum(0).to(v_cmp.dtype)
    return dq, dk_cmp, dv_cmp
