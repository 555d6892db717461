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

Shapes: q [B, T, HQ, D], k and v [B, T, H, D] (HQ % H == 0), g and the branch gates
[B, T, HQ], block indices [B, T, H, block_counts] int32 (block numbers inside the sequence).
With cu_seqlens (int32 [N + 1]), B == 1 and the T axis packs N sequences back to back; blocks
are counted from each sequence's start.

Everything here runs in q's dtype (float64 included), so that running it in a low precision
measures the error that precision causes by itself. Memory is O(T^2) per head: tests only;
production code never calls it.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.varlen import sequence_spans
from gatedfwa.ops.nsa.rules import combine_branches, compressed_attention, mean_pool_blocks, select_blocks_from_importance
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention

__all__ = ["naive_selected_attention", "naive_sliding_branch", "naive_nsa_attention"]


def naive_selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                             block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [n, HQ, D], k/v [n, H, D], block_indices [n, H, S] (-1 = none).

    Builds the full [HQ, n, n] mask of the keys each query attends to. Returns (o_slc
    [n, HQ, D], lse [HQ, n] natural log, -inf for a query without any selected key)."""
    n, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    key_block = torch.arange(n, device=q.device) // block_size  # [n]
    chosen = (block_indices.long()[..., None] == key_block).any(dim=-2)  # [n, H, n]
    t = torch.arange(n, device=q.device)
    visible = chosen & (t[None, :] <= t[:, None])[:, None, :]
    visible = visible.repeat_interleave(group, dim=1).transpose(0, 1)  # [HQ, n, n]
    k_rep = k.repeat_interleave(group, dim=1).transpose(0, 1)
    v_rep = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), k_rep.transpose(1, 2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])
    probs = torch.where(finite[..., None], probs, 0.0)
    return torch.matmul(probs, v_rep).transpose(0, 1), lse


def naive_sliding_branch(q, k, v, g, window_size: int, scale: float, cu_seqlens) -> torch.Tensor:
    """The sliding branch: the window op's quadratic reference, in q's dtype (float64 included)."""
    gate = None if g is None else g.to(q.dtype)
    return naive_gated_window_attention(q, k, v, gate, window_size=window_size, scale=scale,
                                        cu_seqlens=cu_seqlens)[0]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole of NSA, quadratic, in q's dtype. Arguments as gatedfwa.ops.nsa.nsa_attention
    (validated there, not here).

    Returns (o [B, T, HQ, D], block_indices [B, T, H, block_counts] int32): the given
    block_indices, or the selection computed from the compressed branch."""
    batch, seqlen, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if block_indices is not None:
        block_counts = block_indices.shape[-1]
    cmp_parts, slc_parts, index_parts = [], [], []
    for b, start, end in sequence_spans(cu_seqlens, batch, seqlen):
        qs, ks, vs = q[b, start:end], k[b, start:end], v[b, start:end]
        o_c, _, probs = compressed_attention(
            qs, mean_pool_blocks(ks, block_size), mean_pool_blocks(vs, block_size), block_size, scale)
        if block_indices is None:
            importance = probs.unflatten(0, (num_kv_heads, group)).sum(dim=1)  # [H, n, nc]
            indices = select_blocks_from_importance(importance, block_size, block_counts)
        else:
            indices = block_indices[b, start:end]
        o_s, _ = naive_selected_attention(qs, ks, vs, indices, block_size, scale)
        cmp_parts.append(o_c)
        slc_parts.append(o_s)
        index_parts.append(indices.to(torch.int32))
    o_cmp, o_slc, chosen = (_join(parts, cu_seqlens) for parts in (cmp_parts, slc_parts, index_parts))
    branches = [(g_cmp, o_cmp), (g_slc, o_slc)]
    if g_swa is not None:
        branches.append((g_swa, naive_sliding_branch(q, k, v, g, window_size, scale, cu_seqlens)))
    return combine_branches(branches, q.dtype), chosen


def _join(parts: list[torch.Tensor], cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence [n, ...] results back to [B, T, ...]: stacked, or packed along T."""
    return torch.stack(parts) if cu_seqlens is None else torch.cat(parts)[None]
