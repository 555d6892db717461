"""Triton kernels of the selected branch: attention over the keys of each query's selected
blocks (own block masked causally), and the choice between two ways of splitting its work.

Query-major (this file's kernels, forward and dq): a program holds the query heads of one kv
head for BLOCK_Q consecutive queries as rows (layout.py). Each query's block list is
ascending (-1 last), so the program merges the lists: it visits the union of its queries'
blocks in ascending order, each block once, and masks the rows whose query did not select
it. A block loaded once serves every row that chose it: all G heads of a query, and the
neighbouring queries that chose it too.

Block-major (selected_block_major.py): the selection is inverted into, per block, the list of
queries that chose it; a program holds a block's keys and walks its queries. Each (query,
head) row costs a row of q loaded per selected block, not a block of keys: with a small group
(one head per kv head) neighbouring queries share few blocks, and query-major loads a whole
block of keys and values for a row or two of work. The price is atomic float32 additions of
o and dq rows and a second pass of q . k in the forward. dk/dv are block-major either way.

Groups of at most block_major_max_group (launch.TUNING's knob) take the block-major forward
and dq.

    forward  o_slc [B*T, HQ, D], lse2 [B*T, HQ] float32 (base 2)
"""

from __future__ import annotations

import torch

from gatedfwa.ops.nsa import launch
from gatedfwa.ops.nsa.layout import SequenceLayout
from gatedfwa.ops.nsa.selected_block_major import block_keys_backward, block_major_forward, invert_selection
from gatedfwa.ops.common.online_softmax import softmax_lse, softmax_output, softmax_step
from gatedfwa.ops.nsa.tiles import (
    NO_BLOCK,
    check_tiles,
    load_gradient_rows,
    load_keys,
    probabilities,
    query_tile_rows,
    store_rows,
)
from gatedfwa.ops.common.triton_support import LOG2E, jit, tl, token_and_head_strides

__all__ = ["selected_forward", "query_major_forward", "selected_backward", "block_major"]


def block_major(layout: SequenceLayout) -> bool:
    """Whether this call's selected forward and dq are block-major (module docstring): groups
    up to launch.TUNING's block_major_max_group (launch.py, NSAKnobs, with the measurements
    that chose it)."""
    return layout.group <= launch.TUNING.knobs.block_major_max_group


@jit
def _next_block(INDICES, row, valid, cursor, kv_head, num_kv_heads, block_counts):
    """Each row's block at its cursor in its query's ascending list (row: the query's row);
    NO_BLOCK when done."""
    inside = valid & (cursor < block_counts)
    block = tl.load(INDICES + (row * num_kv_heads + kv_head) * block_counts + cursor, mask=inside, other=-1)
    return tl.where(block >= 0, block, NO_BLOCK)


@jit
def _first_block(INDICES, row, valid, kv_head, num_kv_heads, block_counts):
    """Start of the merge of the tile's block lists: (cursor, each row's next block, the
    lowest of them: the block to visit; NO_BLOCK when no row has any)."""
    cursor = tl.zeros(row.shape, dtype=tl.int32)
    current = _next_block(INDICES, row, valid, cursor, kv_head, num_kv_heads, block_counts)
    return cursor, current, tl.min(current, 0)


@jit
def _advance(INDICES, row, valid, cursor, chosen, kv_head, num_kv_heads, block_counts):
    """After visiting a block: the rows that chose it step to their next entry."""
    cursor += chosen.to(tl.int32)
    current = _next_block(INDICES, row, valid, cursor, kv_head, num_kv_heads, block_counts)
    return cursor, current, tl.min(current, 0)


@jit
def _block_keys(bos, eos, block, block_size, k0, BLOCK_K: tl.constexpr):
    """Token positions of keys k0 .. k0 + BLOCK_K of a block, and which of them exist."""
    offs_n = bos + block * block_size + k0 + tl.arange(0, BLOCK_K)
    return offs_n, (k0 + tl.arange(0, BLOCK_K) < block_size) & (offs_n < eos)


@jit
def _selected_forward_kernel(
    Q, K, V, INDICES, O, LSE, CU_SEQLENS, CU_SEQLENS_Q,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    seqlen, seqlen_q, num_q_heads, num_kv_heads, block_size, block_counts, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FEWER_QUERIES: tl.constexpr,
):
    check_tiles(GROUP, GROUP_PAD, ROWS, BLOCK_K, HEAD_DIM, BLOCK_D)
    seq, kv_head, bos, eos, t0, position, row, head, valid, offs_d, q = query_tile_rows(
        Q, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, stride_qt, stride_qh, GROUP, GROUP_PAD, ROWS, HEAD_DIM,
        BLOCK_D, VARLEN, FEWER_QUERIES)
    if t0 >= eos:
        return
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([ROWS], dtype=tl.float32)

    cursor, current, block = _first_block(INDICES, row, valid, kv_head, num_kv_heads, block_counts)
    while block < NO_BLOCK:
        chosen = current == block  # rows whose query selected this block
        for k0 in range(0, block_size, BLOCK_K):
            offs_n, key_ok = _block_keys(bos, eos, block, block_size, k0, BLOCK_K)
            k = load_keys(K, offs_n, key_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, True)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            seen = chosen[:, None] & key_ok[None, :] & (offs_n[None, :] <= position[:, None])
            s = tl.where(seen, s, float("-inf"))
            v = load_keys(V, offs_n, key_ok, kv_head, offs_d, stride_vt, stride_vh, HEAD_DIM, False)
            acc, row_max, row_sum = softmax_step(acc, row_max, row_sum, s, v, DOT_PRECISION)
        cursor, current, block = _advance(INDICES, row, valid, cursor, chosen, kv_head, num_kv_heads, block_counts)
    out = softmax_output(acc, row_sum)
    lse = softmax_lse(row_max, row_sum)
    store_rows(O, out, row, head, valid, offs_d, stride_ot, stride_oh, HEAD_DIM)
    tl.store(LSE + row * num_q_heads + head, lse, mask=valid)


@jit
def _selected_dq_kernel(
    Q, K, V, DO, LSE, DELTA, INDICES, DQ, CU_SEQLENS, CU_SEQLENS_Q,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    seqlen, seqlen_q, num_q_heads, num_kv_heads, block_size, block_counts, qk_scale, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FEWER_QUERIES: tl.constexpr,
):
    check_tiles(GROUP, GROUP_PAD, ROWS, BLOCK_K, HEAD_DIM, BLOCK_D)
    seq, kv_head, bos, eos, t0, position, row, head, valid, offs_d, q = query_tile_rows(
        Q, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, stride_qt, stride_qh, GROUP, GROUP_PAD, ROWS, HEAD_DIM,
        BLOCK_D, VARLEN, FEWER_QUERIES)
    if t0 >= eos:
        return
    do, lse, delta = load_gradient_rows(DO, LSE, DELTA, row, head, valid, offs_d, stride_dot, stride_doh,
                                        num_q_heads, HEAD_DIM)
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    cursor, current, block = _first_block(INDICES, row, valid, kv_head, num_kv_heads, block_counts)
    while block < NO_BLOCK:
        chosen = current == block
        for k0 in range(0, block_size, BLOCK_K):
            offs_n, key_ok = _block_keys(bos, eos, block, block_size, k0, BLOCK_K)
            k = load_keys(K, offs_n, key_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, False)
            v = load_keys(V, offs_n, key_ok, kv_head, offs_d, stride_vt, stride_vh, HEAD_DIM, False)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            seen = chosen[:, None] & key_ok[None, :] & (offs_n[None, :] <= position[:, None])
            p = probabilities(tl.where(seen, s, float("-inf")), lse)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        cursor, current, block = _advance(INDICES, row, valid, cursor, chosen, kv_head, num_kv_heads, block_counts)
    store_rows(DQ, dq * scale, row, head, valid, offs_d, stride_dqt, stride_dqh, HEAD_DIM)


def selected_forward(q, k, v, indices, layout: SequenceLayout, scale: float, inverted=None):
    """q [B, T_q, HQ, D], k/v [B, T_k, H, D] contiguous, indices [B, T_q, H, S] int32
    contiguous (ascending, -1 last). Returns o_slc [B, T_q, HQ, D] and lse2 [B*T_q, HQ]
    float32. A block-major call (block_major(layout)) walks the inverted selection: given (the
    caller keeps it for the backward), or built here."""
    if q.numel() > 0 and block_major(layout):
        if inverted is None:
            inverted = invert_selection(indices, layout)
        return block_major_forward(q, k, v, inverted, layout, scale)
    return query_major_forward(q, k, v, indices, layout, scale)


def query_major_forward(q, k, v, indices, layout: SequenceLayout, scale: float):
    """The selected branch's forward, query-major, whatever the group (decoding takes it: no
    host work to invert the selection). Arguments and result as selected_forward; k and v
    need only the strides of a [tokens, heads, D] view (token_and_head_strides)."""
    o = launch.allocate_like(q)
    lse = torch.empty((layout.batch * layout.seqlen_q, layout.num_q_heads), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o, lse
    config = launch.kernel_config("selected", layout)
    _selected_forward_kernel[layout.grid(config["ROWS"] // layout.group_pad)](
        q, k, v, indices, o, lse, *layout.sequence_pointers(q),
        *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v), *token_and_head_strides(o),
        layout.seqlen_k, layout.seqlen_q, layout.num_q_heads, layout.num_kv_heads, layout.block_size,
        indices.shape[-1], scale * LOG2E, **launch.kernel_flags(layout, q), FEWER_QUERIES=layout.fewer_queries,
        **config,
    )
    return o, lse


def selected_backward(do, q, k, v, indices, o, lse, layout: SequenceLayout, scale: float, inverted=None):
    """(dq, dk, dv) in the inputs' dtypes from the forward's o and lse2; the dk/dv walk takes
    the inverted selection, given or built here."""
    dq = launch.allocate_like(q)
    dk = launch.allocate_like(k)
    dv = launch.allocate_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    delta = (o.float() * do.float()).sum(-1).reshape(-1, layout.num_q_heads)
    config = launch.kernel_config("selected", layout)
    with_dq = block_major(layout)
    if not with_dq:
        _selected_dq_kernel[layout.grid(config["ROWS"] // layout.group_pad)](
            q, k, v, do, lse, delta, indices, dq, *layout.sequence_pointers(q),
            *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v),
            *token_and_head_strides(do), *token_and_head_strides(dq),
            layout.seqlen_k, layout.seqlen_q, layout.num_q_heads, layout.num_kv_heads, layout.block_size,
            indices.shape[-1], scale * LOG2E, scale, **launch.kernel_flags(layout, q),
            FEWER_QUERIES=layout.fewer_queries, **config,
        )
    if inverted is None:
        inverted = invert_selection(indices, layout)
    dk32, dv32, dq32 = block_keys_backward(q, k, v, do, lse, delta, inverted, layout, scale, config, with_dq)
    dk.copy_(dk32)
    dv.copy_(dv32)
    if with_dq:
        dq.copy_(dq32)
    return dq, dk, dv
