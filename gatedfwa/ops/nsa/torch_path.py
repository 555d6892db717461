"""NSA in PyTorch with bounded memory: the path for devices without Triton, differentiable
through autograd. Same rules as naive.py (which states them; rules.py holds the ones every
path shares).

Memory per kv head, for a sequence of n tokens: the compressed branch and the selection hold
[n, n // block_size] scores; the selected branch gathers the block_counts * block_size keys
of a chunk of queries at a time; the sliding branch is the window op's chunked path,
O(n * window). Nothing is O(n^2).

Computes in float32; returns q's dtype.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from gatedfwa.ops.nsa.rules import (
    combine_branches,
    compressed_attention,
    mean_pool_blocks,
    select_blocks_from_importance,
)
from gatedfwa.ops.nsa.sliding import sliding_branch
from gatedfwa.ops.common.varlen import query_key_spans

__all__ = ["chunked_selected_attention", "chunked_nsa_attention"]

# Queries per chunk of the selected branch: the gathered keys are
# [chunk, H, block_counts * block_size, D], about 8M elements at most.
GATHER_ELEMENTS = 1 << 23


def _selected_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, start: int,
                    block_size: int, scale: float) -> torch.Tensor:
    """C queries of one sequence at key positions start .. start + C: q [C, HQ, D], k/v
    [n, H, D] (the whole sequence), block_indices [C, H, S]. Returns o_slc [C, HQ, D]."""
    n, num_kv_heads = k.shape[0], k.shape[1]
    group = q.shape[1] // num_kv_heads
    offsets = torch.arange(block_size, device=q.device)
    heads = torch.arange(num_kv_heads, device=q.device)[None, :, None]
    t = torch.arange(start, start + q.shape[0], device=q.device)[:, None, None, None]
    blocks = block_indices.long().contiguous()[..., None]  # [C, H, S, 1]
    position = blocks * block_size + offsets  # [C, H, S, BS]
    visible = (blocks >= 0) & (position <= t) & (position < n)
    position = torch.where(visible, position, 0).flatten(-2)  # [C, H, S*BS]
    visible = visible.flatten(-2)
    keys = k[position, heads]  # [C, H, S*BS, D]
    values = v[position, heads]
    queries = q.unflatten(1, (num_kv_heads, group))  # [C, H, G, D]
    scores = torch.einsum("chgd,chkd->chgk", queries, keys) * scale
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, 1.0)
    return torch.einsum("chgk,chkd->chgd", probs, values).flatten(1, 2)


def chunked_selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                               block_size: int, scale: float) -> torch.Tensor:
    """One sequence: q [m, HQ, D], k/v [n, H, D] (m <= n: the queries are the last m key
    positions), block_indices [m, H, S] (-1 = none). Gathers each query's selected keys;
    returns o_slc [m, HQ, D] (0 for a query without any)."""
    m, _, head_dim = q.shape
    first_query = k.shape[0] - m
    num_kv_heads = k.shape[1]
    num_selected = block_indices.shape[-1]
    keys_per_query = num_selected * block_size
    chunk = max(1, GATHER_ELEMENTS // max(1, num_kv_heads * keys_per_query * head_dim))
    # Autograd would keep every chunk's gathered keys, values and probabilities until the
    # backward (all of them at once: O(n * block_counts * block_size) per head); checkpointing
    # keeps only the chunk's inputs and gathers again in the backward, one chunk at a time.
    checkpointed = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs = []
    for start in range(0, m, chunk):
        end = min(m, start + chunk)
        args = (q[start:end], k, v, block_indices[start:end], first_query + start, block_size, scale)
        if checkpointed:
            outs.append(torch.utils.checkpoint.checkpoint(_selected_chunk, *args, use_reentrant=False))
        else:
            outs.append(_selected_chunk(*args))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def chunked_nsa_attention(q, k, v, g, g_cmp, g_slc, g_swa, block_size: int, block_counts: int,
                          window_size: int | None, scale: float, cu_seqlens, block_indices,
                          want_indices: bool = False, cu_seqlens_q=None):
    """Arguments as nsa_attention, validated (block_indices canonical; cu_seqlens: k's, and q's
    unless cu_seqlens_q is given). Returns (o [B, T_q, HQ, D] in q's dtype, block_indices
    [B, T_q, H, S] int32: those used, or computed when want_indices; None when the selection
    was neither needed nor wanted)."""
    batch, seqlen, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    compute = torch.float32
    qf, kf, vf = (x.to(compute) for x in (q, k, v))
    need_selection = (g_slc is not None or want_indices) and block_indices is None
    need_compressed = g_cmp is not None or need_selection
    cmp_parts, slc_parts, index_parts = [], [], []
    for b, (q_start, q_end), (k_start, k_end) in query_key_spans(cu_seqlens_q, cu_seqlens, batch, seqlen,
                                                                   k.shape[1]):
        qs, ks, vs = qf[b, q_start:q_end], kf[b, k_start:k_end], vf[b, k_start:k_end]
        first_query = (k_end - k_start) - (q_end - q_start)  # the key position of the first query
        indices = None if block_indices is None else block_indices[b, q_start:q_end]
        if need_compressed:
            o_c, _, probs = compressed_attention(
                qs, mean_pool_blocks(ks, block_size), mean_pool_blocks(vs, block_size), block_size, scale, first_query)
            cmp_parts.append(o_c)
            if need_selection:
                importance = probs.detach().unflatten(0, (num_kv_heads, group)).sum(dim=1)
                indices = select_blocks_from_importance(importance, block_size, block_counts,
                                                        first_query).to(torch.int32)
        if g_slc is not None:
            slc_parts.append(chunked_selected_attention(qs, ks, vs, indices, block_size, scale))
        if indices is not None:
            index_parts.append(indices)
    join = (lambda parts: torch.stack(parts)) if cu_seqlens is None else (lambda parts: torch.cat(parts)[None])
    branches = []
    if g_cmp is not None:
        branches.append((g_cmp, join(cmp_parts)))
    if g_slc is not None:
        branches.append((g_slc, join(slc_parts)))
    if g_swa is not None:
        o_swa = sliding_branch(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q).to(compute)
        branches.append((g_swa, o_swa))
    chosen = join(index_parts) if index_parts else None
    return combine_branches(branches, torch.float32).to(q.dtype), chosen
