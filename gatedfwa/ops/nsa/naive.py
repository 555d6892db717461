"""Native Sparse Attention (NSA) with a gated sliding branch: the float64 oracle of the tests,
and the specification. docs/nsa.md describes the math; the rules below are code in rules.py
(shared with every path) and, for the selected and sliding branches, here.

For one sequence of n tokens, block size BS, kv head h and its G query heads:

* Summaries. Keys and values are cut into blocks of BS tokens from the sequence start; block
  c holds tokens [c*BS, (c+1)*BS). Only complete blocks are summarised (n // BS of them), each
  by the mean of its BS keys (values): k_cmp[c] = mean(k[c*BS : (c+1)*BS]).
* Compressed branch. Query t sees summary c once block c is complete at t:
  (c + 1) * BS <= t + 1. o_cmp_t = softmax_c(scale * q_t . k_cmp[c]) v_cmp; a query that sees
  no summary yet (t < BS - 1) gets o_cmp = 0.
* Selection (shared by the G query heads of a kv head, as NSA prescribes). The importance of a
  visible block c for query t is the sum over the G heads of its compressed-attention
  probability. Block 0 and the query's own block t // BS are always kept (importance +inf);
  blocks after the own block are never candidates. The block_counts candidates of highest
  importance are selected (ties: the lower block index first), listed in ascending order and
  padded with -1 when the query has fewer candidates than block_counts.
* Selected branch. Query t attends to the keys of its selected blocks that are <= t (the
  own block is masked causally): o_slc_t = softmax_j(scale * q_t . k_j) v_j.
* Sliding branch. The GatedFWA window op, gated by the log gates g (None: plain SWA).
* Output. o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa; a branch whose gate is None is
  left out.

Fewer queries than keys: a sequence of n keys with m <= n queries has its queries at its last
key positions, query i at key position t = n - m + i; every rule above reads t so.

Shapes: q [B, T_q, HQ, D], k and v [B, T_k, H, D] (HQ % H == 0, T_q <= T_k), g [B, T_k, HQ]
(it covers key positions, as in the window op), the branch gates [B, T_q, HQ], block indices
[B, T_q, H, block_counts] int32 (block numbers inside the sequence). With cu_seqlens (int32
[N + 1]), B == 1 and the T axis packs N sequences back to back; blocks are counted from each
sequence's start; cu_seqlens_q delimits q's sequences when they are shorter than k's.

Everything here runs in q's dtype (float64 included), so that running it in a low precision
measures the error that precision causes by itself. Memory is O(T^2) per head: tests only;
production code never calls it.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.varlen import query_key_spans
from gatedfwa.ops.nsa.rules import combine_branches, compressed_attention, mean_pool_blocks, select_blocks_from_importance
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention

__all__ = ["naive_selected_attention", "naive_sliding_branch", "naive_nsa_attention"]


def naive_selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                             block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [m, HQ, D], k/v [n, H, D] (m <= n: the queries are the last m key
    positions), block_indices [m, H, S] (-1 = none).

    Builds the full [HQ, m, n] mask of the keys each query attends to. Returns (o_slc
    [m, HQ, D], lse [HQ, m] natural log, -inf for a query without any selected key)."""
    m, num_q_heads, _ = q.shape
    n, num_kv_heads = k.shape[0], k.shape[1]
    group = num_q_heads // num_kv_heads
    key = torch.arange(n, device=q.device)
    chosen = (block_indices.long()[..., None] == key // block_size).any(dim=-2)  # [m, H, n]
    t = torch.arange(n - m, n, device=q.device)  # the queries' key positions
    visible = chosen & (key[None, :] <= t[:, None])[:, None, :]
    visible = visible.repeat_interleave(group, dim=1).transpose(0, 1)  # [HQ, m, n]
    k_rep = k.repeat_interleave(group, dim=1).transpose(0, 1)
    v_rep = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), k_rep.transpose(1, 2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])
    probs = torch.where(finite[..., None], probs, 0.0)
    return torch.matmul(probs, v_rep).transpose(0, 1), lse


def naive_sliding_branch(q, k, v, g, window_size: int, scale: float, cu_seqlens, cu_seqlens_q=None) -> torch.Tensor:
    """The sliding branch: the window op's quadratic reference, in q's dtype (float64 included)."""
    gate = None if g is None else g.to(q.dtype)
    return naive_gated_window_attention(q, k, v, gate, window_size=window_size, scale=scale,
                                        cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q)[0]


def naive_nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_cmp: torch.Tensor | None = None,
    g_slc: torch.Tensor | None = None,
    g_swa: torch.Tensor | None = None,
    *,
    block_size: int = 64,
    block_counts: int = 16,
    window_size: int = 512,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole of NSA, quadratic, in q's dtype. Arguments as gatedfwa.ops.nsa.nsa_attention
    (validated there, not here): cu_seqlens for both sides, or cu_seqlens_q and cu_seqlens_k.

    Returns (o [B, T_q, HQ, D], block_indices [B, T_q, H, block_counts] int32): the given
    block_indices, or the selection computed from the compressed branch."""
    if cu_seqlens_k is not None:
        cu_seqlens = cu_seqlens_k
    batch, seqlen, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if block_indices is not None:
        block_counts = block_indices.shape[-1]
    cmp_parts, slc_parts, index_parts = [], [], []
    for b, (q_start, q_end), (k_start, k_end) in query_key_spans(cu_seqlens_q, cu_seqlens, batch, seqlen,
                                                                   k.shape[1]):
        qs, ks, vs = q[b, q_start:q_end], k[b, k_start:k_end], v[b, k_start:k_end]
        first_query = (k_end - k_start) - (q_end - q_start)  # the key position of query 0
        o_c, _, probs = compressed_attention(
            qs, mean_pool_blocks(ks, block_size), mean_pool_blocks(vs, block_size), block_size, scale, first_query)
        if block_indices is None:
            importance = probs.unflatten(0, (num_kv_heads, group)).sum(dim=1)  # [H, m, nc]
            indices = select_blocks_from_importance(importance, block_size, block_counts, first_query)
        else:
            indices = block_indices[b, q_start:q_end]
        o_s, _ = naive_selected_attention(qs, ks, vs, indices, block_size, scale)
        cmp_parts.append(o_c)
        slc_parts.append(o_s)
        index_parts.append(indices.to(torch.int32))
    o_cmp, o_slc, chosen = (_join(parts, cu_seqlens) for parts in (cmp_parts, slc_parts, index_parts))
    branches = [(g_cmp, o_cmp), (g_slc, o_slc)]
    if g_swa is not None:
        branches.append((g_swa, naive_sliding_branch(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q)))
    return combine_branches(branches, q.dtype), chosen


def _join(parts: list[torch.Tensor], cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence [n, ...] results back to [B, T, ...]: stacked, or packed along T."""
    return torch.stack(parts) if cu_seqlens is None else torch.cat(parts)[None]
