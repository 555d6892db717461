"""Native Sparse Attention (NSA) with a gated sliding branch, in plain PyTorch: the
specification. docs/nsa.md describes the math; this file states every rule in code.

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
measures the error that precision causes by itself. Memory is O(T^2) per head: tests only.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.nsa.sliding import naive_sliding_branch
from gatedfwa.ops.common.varlen import sequence_spans

__all__ = [
    "mean_pool_blocks",
    "naive_compressed_attention",
    "select_blocks_from_importance",
    "naive_selected_attention",
    "naive_nsa_attention",
]


def mean_pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [n, H, D] of one sequence -> [n // block_size, H, D], the mean of each complete block."""
    num_blocks = x.shape[0] // block_size
    return x[: num_blocks * block_size].unflatten(0, (num_blocks, block_size)).mean(dim=1)


def naive_compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence: q [n, HQ, D], k_cmp/v_cmp [nc, H, D].

    Returns (o_cmp [n, HQ, D], lse [HQ, n] natural log, -inf for queries that see no summary,
    probabilities [HQ, n, nc] with 0 at invisible summaries)."""
    n, num_q_heads, _ = q.shape
    num_blocks, num_kv_heads, _ = k_cmp.shape
    group = num_q_heads // num_kv_heads
    k_rep = k_cmp.repeat_interleave(group, dim=1).transpose(0, 1)  # [HQ, nc, D]
    v_rep = v_cmp.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), k_rep.transpose(1, 2)) * scale  # [HQ, n, nc]
    t = torch.arange(n, device=q.device)
    c = torch.arange(num_blocks, device=q.device)
    visible = (c[None, :] + 1) * block_size <= t[:, None] + 1  # [n, nc]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [HQ, n]; -inf where nothing is visible
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])
    probs = torch.where(finite[..., None], probs, 0.0)
    o = torch.matmul(probs, v_rep).transpose(0, 1)  # [n, HQ, D]
    return o, lse, probs


def select_blocks_from_importance(importance: torch.Tensor, block_size: int, block_counts: int) -> torch.Tensor:
    """The selection rule. importance [H, n, nc]: the compressed-attention probabilities of
    each visible summary, summed over the query heads of kv head h (invisible: anything, they
    are masked here).

    Returns [n, H, block_counts] int64: per query the selected block numbers in ascending
    order, -1 padded."""
    num_kv_heads, n, num_complete = importance.shape
    num_blocks = -(-n // block_size)  # blocks with at least one token, the last maybe partial
    t = torch.arange(n, device=importance.device)
    c = torch.arange(num_blocks, device=importance.device)
    own = (t // block_size)[:, None]
    visible = (c[None, :] + 1) * block_size <= t[:, None] + 1  # [n, nb]
    scores = torch.full((num_kv_heads, n, num_blocks), float("-inf"), dtype=importance.dtype,
                        device=importance.device)
    scores[..., :num_complete] = importance
    scores = scores.masked_fill(~visible, float("-inf"))
    always_kept = (c[None, :] == 0) | (c[None, :] == own)
    scores = scores.masked_fill(always_kept, float("inf"))
    # Highest importance first; a stable sort puts the lower block number first among ties.
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    count = min(block_counts, num_blocks)
    chosen = order.indices[..., :count]
    chosen = torch.where(order.values[..., :count] > float("-inf"), chosen, -1)
    # Ascending block numbers, -1 (no block) last.
    padded_key = torch.where(chosen >= 0, chosen, num_blocks)
    ascending = torch.sort(padded_key, dim=-1).values
    chosen = torch.where(ascending < num_blocks, ascending, -1)
    if count < block_counts:
        chosen = torch.cat([chosen, chosen.new_full((num_kv_heads, n, block_counts - count), -1)], dim=-1)
    return chosen.permute(1, 0, 2)


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


def combine_branches(branches: list[tuple[torch.Tensor | None, torch.Tensor | None]],
                     dtype: torch.dtype) -> torch.Tensor:
    """sum of gate[..., None] * o over (gate [B, T, HQ], o [B, T, HQ, D]) pairs whose gate is
    given, computed in dtype."""
    total = None
    for gate, o in branches:
        if gate is None:
            continue
        term = gate.to(dtype)[..., None] * o.to(dtype)
        total = term if total is None else total + term
    return total


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
        o_c, _, probs = naive_compressed_attention(
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
