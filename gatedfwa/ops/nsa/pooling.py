"""Block summaries for the compressed branch: the mean of each complete block of block_size
keys (values), per sequence, differentiable through autograd (the backward spreads each
summary's gradient evenly over its block)."""

from __future__ import annotations

import torch

from gatedfwa.ops.nsa.layout import SequenceLayout

__all__ = ["pool_block_summaries"]


def pool_block_summaries(x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """x [B, T, H, D] -> [num_summaries, H, D] in x's dtype (averaged in float32): the
    summaries of sequence n at rows [summary_offsets[n], summary_offsets[n + 1]), block c of a
    sequence at row offset + c."""
    block = layout.block_size
    heads, dim = x.shape[2], x.shape[3]
    if not layout.varlen:
        count = layout.summaries_per_seq
        blocks = x[:, : count * block].unflatten(1, (count, block))  # [B, count, block, H, D]
        return blocks.float().mean(dim=2).to(x.dtype).reshape(-1, heads, dim)
    starts = []
    offset = 0
    for length in layout.lengths:
        starts.extend(range(offset, offset + (length // block) * block, block))
        offset += length
    if not starts:
        return x.new_zeros((0, heads, dim))
    first = torch.tensor(starts, device=x.device)
    positions = first[:, None] + torch.arange(block, device=x.device)  # [num_summaries, block]
    return x[0, positions].float().mean(dim=1).to(x.dtype)
