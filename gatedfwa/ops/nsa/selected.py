"""Triton kernels of the selected branch: attention over the keys of each query's selected
blocks (own block masked causally).

Forward and dq: a program holds the query heads of one kv head for BLOCK_Q consecutive queries
as rows (layout.py). Each query's block list is ascending (-1 last), so the program merges the
lists: it visits the union of its queries' blocks in ascending order, each block once, and
masks the rows whose query did not select it. Neighbouring queries select largely the same
blocks, so a block loaded once serves several queries (a group of 16 heads fills the rows
with one query; a group of 1 with 16 queries).

dk and dv: the selection is inverted on the host into, per (sequence, kv head, block), the
list of queries that selected the block (compressed sparse rows, sorted by query), and each
list is cut into work items of a bounded number of queries (block 0, kept by every query,
would otherwise be one program walking the whole sequence). A program holds BLOCK_K keys of
one block and walks one item BLOCK_Q queries at a time, their group's heads as columns, and
adds its sums into float32 dk/dv (only a split block's keys get more than one addition).

    forward  o_slc [B*T, HQ, D], lse2 [B*T, HQ] float32 (base 2)
"""

from __future__ import annotations

import torch

from gatedfwa.ops.nsa import tiles
from gatedfwa.ops.nsa.layout import SequenceLayout
from gatedfwa.ops.nsa.tiles import (
    finish_softmax,
    kernel_flags,
    load_gradient_rows,
    load_keys,
    load_rows,
    probabilities,
    query_tile_rows,
    softmax_step,
    store_rows,
)
from gatedfwa.ops.triton_support import LOG2E, cdiv, interpreting, jit, next_power_of_2, tl, token_and_head_strides
from gatedfwa.ops.varlen import sequence_bounds

__all__ = ["selected_forward", "selected_backward", "invert_selection"]

NO_BLOCK = tl.constexpr(1 << 30)  # after every block number: a finished list


@jit
def _next_block(INDICES, position, valid, cursor, kv_head, num_kv_heads, block_counts):
    """Each row's block at its cursor in its query's ascending list; NO_BLOCK when done."""
    inside = valid & (cursor < block_counts)
    block = tl.load(INDICES + (position * num_kv_heads + kv_head) * block_counts + cursor, mask=inside, other=-1)
    return tl.where(block >= 0, block, NO_BLOCK)


@jit
def _first_block(INDICES, position, valid, kv_head, num_kv_heads, block_counts):
    """Start of the merge of the tile's block lists: (cursor, each row's next block, the
    lowest of them: the block to visit; NO_BLOCK when no row has any)."""
    cursor = tl.zeros(position.shape, dtype=tl.int32)
    current = _next_block(INDICES, position, valid, cursor, kv_head, num_kv_heads, block_counts)
    return cursor, current, tl.min(current, 0)


@jit
def _advance(INDICES, position, valid, cursor, chosen, kv_head, num_kv_heads, block_counts):
    """After visiting a block: the rows that chose it step to their next entry."""
    cursor += chosen.to(tl.int32)
    current = _next_block(INDICES, position, valid, cursor, kv_head, num_kv_heads, block_counts)
    return cursor, current, tl.min(current, 0)


@jit
def _block_keys(bos, eos, block, block_size, k0, BLOCK_K: tl.constexpr):
    """Token positions of keys k0 .. k0 + BLOCK_K of a block, and which of them exist."""
    offs_n = bos + block * block_size + k0 + tl.arange(0, BLOCK_K)
    return offs_n, (k0 + tl.arange(0, BLOCK_K) < block_size) & (offs_n < eos)


@jit
def _selected_forward_kernel(
    Q, K, V, INDICES, O, LSE, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    seqlen, num_q_heads, num_kv_heads, block_size, block_counts, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq, kv_head, bos, eos, t0, position, head, valid, offs_d, q = query_tile_rows(
        Q, CU_SEQLENS, seqlen, stride_qt, stride_qh, GROUP, GROUP_PAD, ROWS, HEAD_DIM, BLOCK_D, VARLEN)
    if t0 >= eos:
        return
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([ROWS], dtype=tl.float32)

    cursor, current, block = _first_block(INDICES, position, valid, kv_head, num_kv_heads, block_counts)
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
        cursor, current, block = _advance(INDICES, position, valid, cursor, chosen, kv_head, num_kv_heads,
                                          block_counts)
    out, lse = finish_softmax(acc, row_max, row_sum)
    store_rows(O, out, position, head, valid, offs_d, stride_ot, stride_oh, HEAD_DIM)
    tl.store(LSE + position * num_q_heads + head, lse, mask=valid)


@jit
def _selected_dq_kernel(
    Q, K, V, DO, LSE, DELTA, INDICES, DQ, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    seqlen, num_q_heads, num_kv_heads, block_size, block_counts, qk_scale, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq, kv_head, bos, eos, t0, position, head, valid, offs_d, q = query_tile_rows(
        Q, CU_SEQLENS, seqlen, stride_qt, stride_qh, GROUP, GROUP_PAD, ROWS, HEAD_DIM, BLOCK_D, VARLEN)
    if t0 >= eos:
        return
    do, lse, delta = load_gradient_rows(DO, LSE, DELTA, position, head, valid, offs_d, stride_dot, stride_doh,
                                        num_q_heads, HEAD_DIM)
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    cursor, current, block = _first_block(INDICES, position, valid, kv_head, num_kv_heads, block_counts)
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
        cursor, current, block = _advance(INDICES, position, valid, cursor, chosen, kv_head, num_kv_heads,
                                          block_counts)
    store_rows(DQ, dq * scale, position, head, valid, offs_d, stride_dqt, stride_dqh, HEAD_DIM)


@jit
def _selected_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QUERIES, ITEM_LIST, ITEM_START, ITEM_END, DK, DV, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    seqlen, num_q_heads, num_kv_heads, block_size, max_blocks, qk_scale, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One work item (a run of at most a chunk of the queries that selected one block of one
    kv head, see _work_items) for BLOCK_K keys (part `piece` of the block): dv += P^T do,
    dk += scale * dS^T q over the item's (query, head) rows, added into float32 DK/DV."""
    BLOCK_Q: tl.constexpr = ROWS // GROUP_PAD
    pieces = tl.cdiv(block_size, BLOCK_K)
    item = tl.program_id(0) // pieces
    k0 = (tl.program_id(0) % pieces) * BLOCK_K
    list_id = tl.load(ITEM_LIST + item)
    block = list_id % max_blocks
    kv_head = (list_id // max_blocks) % num_kv_heads
    seq = list_id // (max_blocks * num_kv_heads)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    first_key = bos + block * block_size + k0
    if first_key >= eos:
        return
    offs_n = first_key + tl.arange(0, BLOCK_K)
    key_ok = (k0 + tl.arange(0, BLOCK_K) < block_size) & (offs_n < eos)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_keys(K, offs_n, key_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, False)
    v = load_keys(V, offs_n, key_ok, kv_head, offs_d, stride_vt, stride_vh, HEAD_DIM, False)
    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    start = tl.load(ITEM_START + item)
    end = tl.load(ITEM_END + item)
    r = tl.arange(0, ROWS)
    head = kv_head * GROUP + r % GROUP_PAD
    for i0 in range(start, end, BLOCK_Q):
        entry = i0 + r // GROUP_PAD
        valid = (entry < end) & (r % GROUP_PAD < GROUP)
        position = tl.load(QUERIES + entry, mask=valid, other=0)
        q = load_rows(Q, position, head, valid, offs_d, stride_qt, stride_qh, HEAD_DIM)
        do, lse, delta = load_gradient_rows(DO, LSE, DELTA, position, head, valid, offs_d, stride_dot, stride_doh,
                                            num_q_heads, HEAD_DIM)
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_K, ROWS]
        seen = key_ok[:, None] & valid[None, :] & (offs_n[:, None] <= position[None, :])
        p = tl.where(seen, tl.math.exp2(s - lse[None, :]), 0.0)
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[None, :])
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    # A key whose block list is one item is added onto 0 (exact, so deterministic); only the
    # keys of a block split over several items (block 0, which every query keeps) sum in
    # the order the items finish.
    mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.atomic_add(DK + offs_n[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :], dk * scale, mask=mask,
                  sem="relaxed")
    tl.atomic_add(DV + offs_n[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :], dv, mask=mask,
                  sem="relaxed")


# Rows (query, head) one work item of the dk/dv kernel walks at most: a block every query
# keeps (block 0) is cut into several items so that its program does not run T steps alone.
ROWS_PER_ITEM = 4096


def _work_items(offsets: torch.Tensor, layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(list id, first entry, end entry) int32 [items] of the non-empty block lists of
    invert_selection, each cut into runs of at most ROWS_PER_ITEM // GROUP_PAD queries."""
    chunk = 8 if interpreting() else max(1, ROWS_PER_ITEM // layout.group_pad)  # tests: items split too
    counts = (offsets[1:] - offsets[:-1]).long()
    pieces = (counts + chunk - 1) // chunk  # 0 for a block nobody selected
    list_id = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), pieces)
    first_item = torch.cumsum(pieces, 0) - pieces
    within = torch.arange(list_id.numel(), device=counts.device) - first_item[list_id]
    start = offsets[:-1].long()[list_id] + within * chunk
    end = torch.minimum(start + chunk, offsets[1:].long()[list_id])
    return list_id.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


def _config(layout: SequenceLayout) -> dict:
    """ROWS query rows per program; BLOCK_K keys per tile (a block is one or more tiles)."""
    block_k = max(16, min(64, next_power_of_2(layout.block_size)))
    if interpreting():
        return dict(ROWS=max(64, layout.group_pad), BLOCK_K=block_k, num_warps=4, num_stages=1)
    return dict(ROWS=max(16, layout.group_pad), BLOCK_K=block_k, num_warps=4, num_stages=2)


def selected_forward(q, k, v, indices, layout: SequenceLayout, scale: float):
    """q [B, T, HQ, D], k/v [B, T, H, D] contiguous, indices [B, T, H, S] int32 contiguous
    (ascending, -1 last). Returns o_slc [B, T, HQ, D] and lse2 [B*T, HQ] float32."""
    o = tiles.allocate_like(q)
    lse = torch.empty((layout.batch * layout.seqlen, layout.num_q_heads), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o, lse
    config = _config(layout)
    _selected_forward_kernel[layout.grid(config["ROWS"] // layout.group_pad)](
        q, k, v, indices, o, lse, layout.cu_seqlens if layout.varlen else q,
        *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v), *token_and_head_strides(o),
        layout.seqlen, layout.num_q_heads, layout.num_kv_heads, layout.block_size, indices.shape[-1],
        scale * LOG2E, **kernel_flags(layout, q), **config,
    )
    return o, lse


def invert_selection(indices: torch.Tensor, layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [B, T, H, S] -> (queries int32 [entries], offsets int32 [N * H * max_blocks + 1]):
    the flattened positions of the queries that selected block c of kv head h in sequence n
    are queries[offsets[l] : offsets[l + 1]], l = (n * H + h) * max_blocks + c, ascending."""
    tokens, heads = layout.batch * layout.seqlen, layout.num_kv_heads
    flat = indices.reshape(tokens, heads, -1).long()
    chosen = flat >= 0
    sequence = layout.sequence_ids()[:, None, None]
    list_id = (sequence * heads + torch.arange(heads, device=flat.device)[None, :, None]) * layout.max_blocks + flat
    position = torch.arange(tokens, device=flat.device)[:, None, None].expand_as(flat)
    list_id, position = list_id[chosen], position[chosen]
    order = torch.argsort(list_id, stable=True)  # entries already ascend by position
    num_lists = layout.num_seqs * heads * layout.max_blocks
    counts = torch.bincount(list_id, minlength=num_lists)
    offsets = torch.zeros(num_lists + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    queries = position[order].to(torch.int32)
    if queries.numel() == 0:
        queries = torch.zeros(1, dtype=torch.int32, device=flat.device)
    return queries, offsets


def selected_backward(do, q, k, v, indices, o, lse, layout: SequenceLayout, scale: float):
    """(dq, dk, dv) in the inputs' dtypes from the forward's o and lse2."""
    dq = tiles.allocate_like(q)
    dk = tiles.allocate_like(k)
    dv = tiles.allocate_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    delta = (o.float() * do.float()).sum(-1).reshape(-1, layout.num_q_heads)
    config = _config(layout)
    cu = layout.cu_seqlens if layout.varlen else q
    block_counts = indices.shape[-1]
    _selected_dq_kernel[layout.grid(config["ROWS"] // layout.group_pad)](
        q, k, v, do, lse, delta, indices, dq, cu,
        *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v), *token_and_head_strides(do), *token_and_head_strides(dq),
        layout.seqlen, layout.num_q_heads, layout.num_kv_heads, layout.block_size, block_counts,
        scale * LOG2E, scale, **kernel_flags(layout, q), **config,
    )
    queries, offsets = invert_selection(indices, layout)
    item_list, item_start, item_end = _work_items(offsets, layout)
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if item_list.numel() > 0:
        pieces = cdiv(layout.block_size, config["BLOCK_K"])
        _selected_dkdv_kernel[(item_list.numel() * pieces, 1, 1)](
            q, k, v, do, lse, delta, queries, item_list, item_start, item_end, dk32, dv32, cu,
            *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v), *token_and_head_strides(do),
            *token_and_head_strides(dk32), *token_and_head_strides(dv32),
            layout.seqlen, layout.num_q_heads, layout.num_kv_heads, layout.block_size, layout.max_blocks,
            scale * LOG2E, scale, **kernel_flags(layout, q), **config,
        )
    dk.copy_(dk32)
    dv.copy_(dv32)
    return dq, dk, dv
