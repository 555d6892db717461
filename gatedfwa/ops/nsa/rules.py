"""NSA's rules as PyTorch functions of one sequence, shared by every path: the float64 oracle
(naive.py), the PyTorch path (torch_path.py), decoding (decode.py), and the Triton path for
combining its branches (triton_path.py). naive.py states the rules in words; docs/nsa.md
derives them.

    mean_pool_blocks               block summaries: the mean of each complete block
    compressed_attention           attention over the summaries visible to each query
    select_blocks_from_importance  the selection rule
    combine_branches               o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa

Each runs in its inputs' dtype (float64 included).
"""

from __future__ import annotations

import torch

__all__ = ["mean_pool_blocks", "compressed_attention", "select_blocks_from_importance", "combine_branches"]


def mean_pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [n, H, D] of one sequence -> [n // block_size, H, D], the mean of each complete block."""
    num_blocks = x.shape[0] // block_size
    return x[: num_blocks * block_size].unflatten(0, (num_blocks, block_size)).mean(dim=1)


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int,
                         scale: float, first_query: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence: q [n, HQ, D], k_cmp/v_cmp [nc, H, D]; query i at key position
    first_query + i (0 unless the queries are the last ones of a longer sequence of keys).

    Returns (o_cmp [n, HQ, D], lse [HQ, n] natural log, -inf for queries that see no summary,
    probabilities [HQ, n, nc] with 0 at invisible summaries)."""
    n, num_q_heads, _ = q.shape
    num_blocks, num_kv_heads, _ = k_cmp.shape
    group = num_q_heads // num_kv_heads
    k_rep = k_cmp.repeat_interleave(group, dim=1).transpose(0, 1)  # [HQ, nc, D]
    v_rep = v_cmp.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), k_rep.transpose(1, 2)) * scale  # [HQ, n, nc]
    t = torch.arange(first_query, first_query + n, device=q.device)
    c = torch.arange(num_blocks, device=q.device)
    visible = (c[None, :] + 1) * block_size <= t[:, None] + 1  # [n, nc]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [HQ, n]; -inf where nothing is visible
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])
    probs = torch.where(finite[..., None], probs, 0.0)
    o = torch.matmul(probs, v_rep).transpose(0, 1)  # [n, HQ, D]
    return o, lse, probs


def select_blocks_from_importance(importance: torch.Tensor, block_size: int, block_counts: int,
                                  first_query: int = 0) -> torch.Tensor:
    """The selection rule. importance [H, n, nc]: the compressed-attention probabilities of
    each visible summary, summed over the query heads of kv head h (invisible: anything, they
    are masked here); query i at key position first_query + i (as compressed_attention).

    Returns [n, H, block_counts] int64: per query the selected block numbers in ascending
    order, -1 padded."""
    num_kv_heads, n, num_complete = importance.shape
    num_keys = first_query + n
    num_blocks = -(-num_keys // block_size)  # blocks with at least one key, the last maybe partial
    t = torch.arange(first_query, num_keys, device=importance.device)
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
