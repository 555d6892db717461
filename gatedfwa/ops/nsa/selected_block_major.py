"""Selected attention walked block by block: the selection inverted into, per (sequence, kv
head, block), the sorted list of queries that chose the block, and kernels in which a program
holds BLOCK_K keys of one block and walks a run of that list (a work item).

A block's keys are loaded once per item, and each (query, head) row that chose the block costs
one row of q (and do) loaded, however few queries share a block. That is what a small group
needs: with one query head per kv head, neighbouring queries share few selected blocks, and a
program per query tile (selected.py, query-major) loads a whole block of keys and values for
a row or two of work.

    dk, dv     (both strategies) dv += P^T do, dk += scale * dS^T q over the item's rows,
               added into float32 dk/dv; with WITH_DQ (block-major backward) also
               dq += scale * dS k, added into float32 dq
    forward    (block-major) two passes over the items: partial log-sum-exps of each (query,
               head) row over the item's keys, combined per row into lse2 on the host; then
               P V with the final lse2, added into float32 o

The additions into float32 outputs are atomic: a key of a block with one item gets one
addition onto 0 (exact, deterministic), while query rows (o, dq) receive one addition per
selected block and sum in the order the programs finish.

    invert_selection  indices [B, T, H, S] -> queries [entries], offsets, kv head per entry
    work_items        the lists cut into runs of at most ROWS_PER_ITEM rows (launch.TUNING)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gatedfwa.ops.nsa import launch
from gatedfwa.ops.nsa.layout import SequenceLayout
from gatedfwa.ops.nsa.tiles import add_rows, check_tiles, load_gradient_rows, load_keys, load_rows, probabilities
from gatedfwa.ops.common.triton_support import LOG2E, cdiv, jit, tl, token_and_head_strides
from gatedfwa.ops.common.varlen import query_bounds, sequence_bounds

__all__ = ["InvertedSelection", "invert_selection", "work_items", "block_major_forward", "block_keys_backward"]


# ---------------------------------------------------------------------------------------------
# The inverted selection and its work items (host)
# ---------------------------------------------------------------------------------------------

class InvertedSelection(NamedTuple):
    """The queries that selected each block: those of list l = (n * H + h) * max_blocks + c
    (block c of kv head h in sequence n) are queries[offsets[l] : offsets[l + 1]], query rows
    (flattened q tokens) in ascending order; kv_heads[e] is the kv head of entry e."""

    queries: torch.Tensor  # int32 [max(entries, 1)]
    offsets: torch.Tensor  # int32 [N * H * max_blocks + 1]
    kv_heads: torch.Tensor  # int32 [entries]

    @property
    def entries(self) -> int:
        return self.kv_heads.numel()


def invert_selection(indices: torch.Tensor, layout: SequenceLayout) -> InvertedSelection:
    """indices [B, T_q, H, S] int32 (-1: no block) -> InvertedSelection; the entries are
    query rows (flattened q tokens)."""
    tokens, heads = layout.batch * layout.seqlen_q, layout.num_kv_heads
    num_lists = layout.num_seqs * heads * layout.max_blocks
    # int32 sort keys where they fit: the sort of T * H * S entries is the costly step here.
    key_dtype = torch.int32 if num_lists < 2**31 else torch.int64
    flat = indices.reshape(tokens, heads, -1).to(key_dtype)
    chosen = flat >= 0
    sequence = layout.sequence_ids().to(key_dtype)[:, None, None]
    list_id = (sequence * heads + torch.arange(heads, device=flat.device, dtype=key_dtype)[None, :, None]) \
        * layout.max_blocks + flat
    position = torch.arange(tokens, device=flat.device, dtype=torch.int32)[:, None, None].expand_as(flat)
    list_id, position = list_id[chosen], position[chosen]
    order = torch.argsort(list_id, stable=True)  # entries already ascend by position
    counts = torch.bincount(list_id, minlength=num_lists)
    offsets = torch.zeros(num_lists + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    list_id = list_id[order]
    queries = position[order]
    if queries.numel() == 0:
        queries = torch.zeros(1, dtype=torch.int32, device=flat.device)  # a pointer to pass; never read
    return InvertedSelection(queries, offsets, ((list_id // layout.max_blocks) % heads).to(torch.int32))


def work_items(offsets: torch.Tensor, layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(list id, first entry, end entry) int32 [items] of the non-empty block lists of
    invert_selection, each cut into runs of at most launch.queries_per_item(layout) queries
    (TUNING's ROWS_PER_ITEM rows: a block every query keeps, block 0, is cut into several
    items so that its program does not run T steps alone)."""
    chunk = launch.queries_per_item(layout)
    counts = (offsets[1:] - offsets[:-1]).long()
    pieces = (counts + chunk - 1) // chunk  # 0 for a block nobody selected
    list_id = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), pieces)
    first_item = torch.cumsum(pieces, 0) - pieces
    within = torch.arange(list_id.numel(), device=counts.device) - first_item[list_id]
    start = offsets[:-1].long()[list_id] + within * chunk
    end = torch.minimum(start + chunk, offsets[1:].long()[list_id])
    return list_id.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Kernels: one program per (work item, key tile of its block)
# ---------------------------------------------------------------------------------------------

@jit
def _item_keys(ITEM_LIST, ITEM_START, ITEM_END, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, num_kv_heads, block_size,
               max_blocks, BLOCK_K: tl.constexpr, VARLEN: tl.constexpr, FEWER_QUERIES: tl.constexpr):
    """The program's work item and key tile (grid axis 0: item * pieces + piece, a piece being
    BLOCK_K keys of the block). Returns (piece, kv head, first and end entry of the item, key
    positions [BLOCK_K], which of them exist, the sequence's shift: query row = key position +
    shift, layout.py)."""
    pieces = tl.cdiv(block_size, BLOCK_K)
    item = tl.program_id(0) // pieces
    piece = tl.program_id(0) % pieces
    list_id = tl.load(ITEM_LIST + item)
    block = list_id % max_blocks
    kv_head = (list_id // max_blocks) % num_kv_heads
    seq = list_id // (max_blocks * num_kv_heads)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    _, shift = query_bounds(CU_SEQLENS_Q, seq, seqlen_q, bos, eos, VARLEN, FEWER_QUERIES)
    in_block = piece * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = bos + block * block_size + in_block
    key_ok = (in_block < block_size) & (offs_n < eos)
    return piece, kv_head, tl.load(ITEM_START + item), tl.load(ITEM_END + item), offs_n, key_ok, shift


@jit
def _entry_rows(QUERIES, i0, end, kv_head, shift, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                ROWS: tl.constexpr):
    """Rows of entries i0 .. i0 + ROWS // GROUP_PAD of an item, their group's heads side by
    side (layout.py): per row its entry, query row, key position (row - shift), query head,
    head within the group and whether it is real."""
    r = tl.arange(0, ROWS)
    entry = i0 + r // GROUP_PAD
    in_group = r % GROUP_PAD
    valid = (entry < end) & (in_group < GROUP)
    row = tl.load(QUERIES + entry, mask=valid, other=0)
    return entry, row, row - shift, kv_head * GROUP + in_group, in_group, valid


# The block count per sequence (with the longest sequence) and the entries of the inverted
# selection change from call to call; they only split the list id into (sequence, kv head,
# block) and place a partial result whose other terms are not aligned anyway, so specialising
# on their values (== 1, divisible by 16) would compile variants for nothing.
@jit(do_not_specialize=["max_blocks", "num_entries"])
def _selected_row_lse_kernel(
    Q, K, QUERIES, ITEM_LIST, ITEM_START, ITEM_END, PARTIAL, CU_SEQLENS, CU_SEQLENS_Q,
    stride_qt, stride_qh, stride_kt, stride_kh,
    seqlen, seqlen_q, num_kv_heads, block_size, max_blocks, num_entries, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FEWER_QUERIES: tl.constexpr,
):
    """Forward pass 1: PARTIAL[piece, entry, head in group] = log2 sum_j exp2(s_j) over the
    piece's keys j the row sees (-inf when it sees none)."""
    check_tiles(GROUP, GROUP_PAD, ROWS, BLOCK_K, HEAD_DIM, BLOCK_D)
    BLOCK_Q: tl.constexpr = ROWS // GROUP_PAD
    piece, kv_head, start, end, offs_n, key_ok, shift = _item_keys(
        ITEM_LIST, ITEM_START, ITEM_END, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, num_kv_heads, block_size,
        max_blocks, BLOCK_K, VARLEN, FEWER_QUERIES)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_keys(K, offs_n, key_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, True)  # [BLOCK_D, BLOCK_K]
    for i0 in range(start, end, BLOCK_Q):
        entry, row, position, head, in_group, valid = _entry_rows(QUERIES, i0, end, kv_head, shift, GROUP,
                                                                  GROUP_PAD, ROWS)
        q = load_rows(Q, row, head, valid, offs_d, stride_qt, stride_qh, HEAD_DIM)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_ok[None, :] & (offs_n[None, :] <= position[:, None]), s, float("-inf"))
        row_max = tl.max(s, 1)
        safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        row_sum = tl.sum(tl.math.exp2(s - safe_max[:, None]), 1)
        partial = tl.where(row_sum > 0.0, safe_max + tl.math.log2(tl.where(row_sum > 0.0, row_sum, 1.0)),
                           float("-inf"))
        slot = (piece.to(tl.int64) * num_entries + entry) * GROUP + in_group  # past 2^31 at long packed batches
        tl.store(PARTIAL + slot, partial, mask=valid)


@jit(do_not_specialize=["max_blocks"])
def _selected_output_kernel(
    Q, K, V, LSE, QUERIES, ITEM_LIST, ITEM_START, ITEM_END, O, CU_SEQLENS, CU_SEQLENS_Q,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    seqlen, seqlen_q, num_q_heads, num_kv_heads, block_size, max_blocks, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FEWER_QUERIES: tl.constexpr,
):
    """Forward pass 2: o += exp2(s - lse2) v over the piece's keys, into float32 O."""
    check_tiles(GROUP, GROUP_PAD, ROWS, BLOCK_K, HEAD_DIM, BLOCK_D)
    BLOCK_Q: tl.constexpr = ROWS // GROUP_PAD
    piece, kv_head, start, end, offs_n, key_ok, shift = _item_keys(
        ITEM_LIST, ITEM_START, ITEM_END, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, num_kv_heads, block_size,
        max_blocks, BLOCK_K, VARLEN, FEWER_QUERIES)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_keys(K, offs_n, key_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, True)
    v = load_keys(V, offs_n, key_ok, kv_head, offs_d, stride_vt, stride_vh, HEAD_DIM, False)
    for i0 in range(start, end, BLOCK_Q):
        entry, row, position, head, in_group, valid = _entry_rows(QUERIES, i0, end, kv_head, shift, GROUP,
                                                                  GROUP_PAD, ROWS)
        q = load_rows(Q, row, head, valid, offs_d, stride_qt, stride_qh, HEAD_DIM)
        lse = tl.load(LSE + row * num_q_heads + head, mask=valid, other=float("-inf"))
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        seen = valid[:, None] & key_ok[None, :] & (offs_n[None, :] <= position[:, None])
        p = probabilities(tl.where(seen, s, float("-inf")), lse)
        out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        add_rows(O, out, row, head, valid, offs_d, stride_ot, stride_oh, HEAD_DIM)


@jit(do_not_specialize=["max_blocks"])
def _selected_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QUERIES, ITEM_LIST, ITEM_START, ITEM_END, DK, DV, DQ, CU_SEQLENS, CU_SEQLENS_Q,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    seqlen, seqlen_q, num_q_heads, num_kv_heads, block_size, max_blocks, qk_scale, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WITH_DQ: tl.constexpr, FEWER_QUERIES: tl.constexpr,
):
    """dv += P^T do, dk += scale * dS^T q over the item's (query, head) rows for the piece's
    keys, added into float32 DK/DV; WITH_DQ: also dq += scale * dS k into float32 DQ."""
    check_tiles(GROUP, GROUP_PAD, ROWS, BLOCK_K, HEAD_DIM, BLOCK_D)
    BLOCK_Q: tl.constexpr = ROWS // GROUP_PAD
    piece, kv_head, start, end, offs_n, key_ok, shift = _item_keys(
        ITEM_LIST, ITEM_START, ITEM_END, CU_SEQLENS, CU_SEQLENS_Q, seqlen, seqlen_q, num_kv_heads, block_size,
        max_blocks, BLOCK_K, VARLEN, FEWER_QUERIES)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_keys(K, offs_n, key_ok, kv_head, offs_d, stride_kt, stride_kh, HEAD_DIM, False)
    v = load_keys(V, offs_n, key_ok, kv_head, offs_d, stride_vt, stride_vh, HEAD_DIM, False)
    dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for i0 in range(start, end, BLOCK_Q):
        entry, row, position, head, in_group, valid = _entry_rows(QUERIES, i0, end, kv_head, shift, GROUP,
                                                                  GROUP_PAD, ROWS)
        q = load_rows(Q, row, head, valid, offs_d, stride_qt, stride_qh, HEAD_DIM)
        do, lse, delta = load_gradient_rows(DO, LSE, DELTA, row, head, valid, offs_d, stride_dot, stride_doh,
                                            num_q_heads, HEAD_DIM)
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_K, ROWS]
        seen = key_ok[:, None] & valid[None, :] & (offs_n[:, None] <= position[None, :])
        p = tl.where(seen, tl.math.exp2(s - lse[None, :]), 0.0)
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[None, :])
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if WITH_DQ:
            dq = tl.dot(tl.trans(ds.to(k.dtype)), k, input_precision=DOT_PRECISION)  # [ROWS, BLOCK_D]
            add_rows(DQ, dq * scale, row, head, valid, offs_d, stride_dqt, stride_dqh, HEAD_DIM)
    mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.atomic_add(DK + offs_n[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :], dk * scale, mask=mask,
                  sem="relaxed")
    tl.atomic_add(DV + offs_n[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :], dv, mask=mask,
                  sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------

def _combine_partials(partial: torch.Tensor, inverted: InvertedSelection, layout: SequenceLayout) -> torch.Tensor:
    """partial [pieces, entries, G] base-2 log-sum-exps -> lse2 [B*T, HQ] float32: per (query,
    head) row, log2 of the sum of 2^partial over its entries and pieces; -inf for a row
    without any."""
    group, num_rows = layout.group, layout.batch * layout.seqlen_q * layout.num_q_heads
    first_head = inverted.queries[: inverted.entries].long() * layout.num_q_heads + inverted.kv_heads.long() * group
    rows = (first_head[:, None] + torch.arange(group, device=partial.device)).expand_as(partial).reshape(-1)
    values = partial.reshape(-1)
    top = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=partial.device)
    top.scatter_reduce_(0, rows, values, "amax")
    safe_top = torch.where(top == float("-inf"), 0.0, top)
    total = torch.zeros_like(top).index_add_(0, rows, torch.exp2(values - safe_top[rows]))
    lse = torch.where(total > 0, safe_top + torch.log2(torch.where(total > 0, total, 1.0)), float("-inf"))
    return lse.view(-1, layout.num_q_heads)


def block_major_forward(q, k, v, inverted: InvertedSelection, layout: SequenceLayout, scale: float):
    """The selected branch's forward, block-major. q [B, T, HQ, D], k/v [B, T, H, D]
    contiguous, the inverted selection. Returns o_slc [B, T, HQ, D] in q's dtype and lse2
    [B*T, HQ] float32 (base 2)."""
    o32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    item_list, item_start, item_end = work_items(inverted.offsets, layout)
    if item_list.numel() == 0:
        lse = torch.full((layout.batch * layout.seqlen_q, layout.num_q_heads), float("-inf"), device=q.device)
        return o32.to(q.dtype), lse
    config = launch.kernel_config("block_major", layout)
    pieces = cdiv(layout.block_size, config["BLOCK_K"])
    grid = (item_list.numel() * pieces, 1, 1)
    cu = layout.sequence_pointers(q)
    flags = dict(**launch.kernel_flags(layout, q), FEWER_QUERIES=layout.fewer_queries, **config)
    items = (inverted.queries, item_list, item_start, item_end)
    # Every (piece, entry, head) is written, -inf where the row sees none of the piece's keys.
    partial = launch.allocate_like(q.new_empty((pieces, inverted.entries, layout.group), dtype=torch.float32))
    _selected_row_lse_kernel[grid](
        q, k, *items, partial, *cu, *token_and_head_strides(q), *token_and_head_strides(k),
        layout.seqlen_k, layout.seqlen_q, layout.num_kv_heads, layout.block_size, layout.max_blocks, inverted.entries,
        scale * LOG2E, **flags,
    )
    lse = _combine_partials(partial, inverted, layout)
    _selected_output_kernel[grid](
        q, k, v, lse, *items, o32, *cu,
        *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v),
        *token_and_head_strides(o32),
        layout.seqlen_k, layout.seqlen_q, layout.num_q_heads, layout.num_kv_heads, layout.block_size,
        layout.max_blocks, scale * LOG2E, **flags,
    )
    return o32.to(q.dtype), lse


def block_keys_backward(q, k, v, do, lse, delta, inverted: InvertedSelection, layout: SequenceLayout, scale: float,
                        config: dict, with_dq: bool):
    """float32 (dk, dv [B, T, H, D], dq [B, T, HQ, D] or None) of the selected branch from
    the forward's lse2 and delta = rowsum(o * do) [B*T, HQ]; dq only with with_dq. config:
    ROWS, BLOCK_K and the launch options (launch.kernel_config("selected", layout))."""
    item_list, item_start, item_end = work_items(inverted.offsets, layout)
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if with_dq else None
    if item_list.numel() > 0:
        pieces = cdiv(layout.block_size, config["BLOCK_K"])
        dq_arg = dq32 if with_dq else dk32  # never written without WITH_DQ
        _selected_dkdv_kernel[(item_list.numel() * pieces, 1, 1)](
            q, k, v, do, lse, delta, inverted.queries, item_list, item_start, item_end, dk32, dv32, dq_arg,
            *layout.sequence_pointers(q),
            *token_and_head_strides(q), *token_and_head_strides(k), *token_and_head_strides(v),
            *token_and_head_strides(do), *token_and_head_strides(dk32), *token_and_head_strides(dv32),
            *token_and_head_strides(dq_arg),
            layout.seqlen_k, layout.seqlen_q, layout.num_q_heads, layout.num_kv_heads, layout.block_size,
            layout.max_blocks, scale * LOG2E, scale, **launch.kernel_flags(layout, q), **config, WITH_DQ=with_dq,
            FEWER_QUERIES=layout.fewer_queries,
        )
    return dk32, dv32, dq32
