"""Triton kernel of the block selection: top-block_counts blocks per query and kv head from
the compressed-attention probabilities (rule: rules.py, select_blocks_from_importance).

A program holds the query heads of one kv head for BLOCK_Q consecutive queries as rows
(layout.py). It recomputes the compressed logits tile by tile, turns them into probabilities
with the forward's lse2, sums them over the group's heads (the importance of each block for
each query) and keeps a running list of the best S_PAD candidates per query:

    * candidates: visible summaries (importance), block 0 and the own block (+inf);
    * insertion: while some query has a tile candidate better than its list's worst entry,
      the best tile candidate replaces the worst entry. Ties go to the lower block number:
      tiles come in ascending order, a tile's best is its lowest-numbered maximum, an entry
      is replaced only by a strictly better one, and among equal worst entries the highest
      numbered is replaced;
    * list slots past block_counts hold +inf with no block, so they are never replaced.

At the end each query's list is written in ascending block order, -1 (no block) last: the rank
of an entry is the number of entries with a smaller key. Nothing of size T x T/block_size is
stored; the cost is one extra pass of q . k_cmp over the visible summaries.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.nsa import launch
from gatedfwa.ops.nsa.layout import SequenceLayout
from gatedfwa.ops.nsa.tiles import NO_BLOCK, check_tiles, load_keys, query_tile_rows, summary_bounds
from gatedfwa.ops.common.triton_support import LOG2E, dot_precision, jit, next_power_of_2, tl, token_and_head_strides

__all__ = ["select_blocks"]

@jit
def _select_kernel(
    Q, KC, LSE, INDICES, CU_SEQLENS, CU_SEQLENS_Q, SUMMARY_OFFSETS,
    stride_qt, stride_qh, stride_kt, stride_kh,
    seqlen, seqlen_q, summaries_per_seq, num_q_heads, num_kv_heads, block_size, block_counts, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, S_PAD: tl.constexpr,
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
    lse = tl.load(LSE + row * num_q_heads + head, mask=valid, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows that see nothing: all logits masked
    row_visible = (position - bos + 1) // block_size

    # Per query (not per row): its key position, visible summaries, own block.
    query_pos = t0 + tl.arange(0, BLOCK_Q)
    query_ok = query_pos < eos
    query_visible = (query_pos - bos + 1) // block_size
    own_block = (query_pos - bos) // block_size
    slot = tl.arange(0, S_PAD)
    best = tl.where(slot < block_counts, float("-inf"), float("inf"))[None, :] + tl.zeros([BLOCK_Q, S_PAD], tl.float32)
    best_block = tl.full([BLOCK_Q, S_PAD], -1, dtype=tl.int32)

    num_blocks = (tl.minimum(t0 + BLOCK_Q, eos) - 1 - bos) // block_size + 1  # up to the last own block
    for c0 in range(0, num_blocks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        k = load_keys(KC, first_summary + offs_c, offs_c < num_summaries, kv_head, offs_d, stride_kt, stride_kh,
                      HEAD_DIM, True)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        seen = valid[:, None] & (offs_c[None, :] < row_visible[:, None])
        p = tl.where(seen, tl.math.exp2(s - lse[:, None]), 0.0)
        importance = tl.sum(tl.reshape(p, [BLOCK_Q, GROUP_PAD, BLOCK_C]), 1)  # [BLOCK_Q, BLOCK_C]
        candidate = tl.where(offs_c[None, :] < query_visible[:, None], importance, float("-inf"))
        always_kept = (offs_c[None, :] == 0) | (offs_c[None, :] == own_block[:, None])
        candidate = tl.where(always_kept, float("inf"), candidate)
        candidate = tl.where(query_ok[:, None], candidate, float("-inf"))

        top = tl.max(candidate, 1)
        worst = tl.min(best, 1)
        while tl.max((top > worst).to(tl.int32), 0) > 0:
            top_at = tl.argmax(candidate, 1)  # lowest-numbered among equal maxima
            # Among equal worst entries, replace the highest-numbered block.
            worst_at = tl.argmax(tl.where(best == worst[:, None], (best_block + 1) * S_PAD + slot[None, :], -1), 1) % S_PAD
            take = top > worst
            replace = (slot[None, :] == worst_at[:, None]) & take[:, None]
            best = tl.where(replace, top[:, None], best)
            best_block = tl.where(replace, (c0 + top_at)[:, None], best_block)
            taken = (tl.arange(0, BLOCK_C)[None, :] == top_at[:, None]) & take[:, None]
            candidate = tl.where(taken, float("-inf"), candidate)
            top = tl.max(candidate, 1)
            worst = tl.min(best, 1)

    key = tl.where(best_block >= 0, best_block, NO_BLOCK + slot[None, :])  # NO_BLOCK + slot: all distinct
    rank = tl.sum((key[:, None, :] < key[:, :, None]).to(tl.int32), 2)  # [BLOCK_Q, S_PAD]
    query_row = query_pos + tl.max(row - position, 0)  # row - position: the shift, the same in every row
    out = INDICES + (query_row[:, None] * num_kv_heads + kv_head) * block_counts + rank
    tl.store(out, best_block, mask=query_ok[:, None] & (rank < block_counts))


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, layout: SequenceLayout,
                  block_counts: int, scale: float) -> torch.Tensor:
    """q [B, T, HQ, D] contiguous, k_cmp [num_summaries, H, D], lse [B*T, HQ] (base 2, from
    compressed_forward). Returns block indices [B, T, H, block_counts] int32, each row
    ascending, -1 last."""
    indices = launch.allocate_indices((layout.batch, layout.seqlen_q, layout.num_kv_heads, block_counts), q.device)
    if q.numel() == 0:
        return indices
    if k_cmp.shape[0] == 0:
        k_cmp = k_cmp.new_zeros((1, *k_cmp.shape[1:]))
    config = launch.kernel_config("selection", layout)
    varlen = layout.varlen
    _select_kernel[layout.grid(config["ROWS"] // layout.group_pad)](
        q, k_cmp, lse, indices, *layout.sequence_pointers(q), layout.summary_offsets if varlen else q,
        *token_and_head_strides(q), k_cmp.stride(0), k_cmp.stride(1),
        layout.seqlen_k, layout.seqlen_q, layout.summaries_per_seq, layout.num_q_heads, layout.num_kv_heads, layout.block_size,
        block_counts, scale * LOG2E,
        GROUP=layout.group, GROUP_PAD=layout.group_pad, S_PAD=max(2, next_power_of_2(block_counts)),
        HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d, VARLEN=varlen, DOT_PRECISION=dot_precision(q.dtype),
        FEWER_QUERIES=layout.fewer_queries, **config,
    )
    return indices
