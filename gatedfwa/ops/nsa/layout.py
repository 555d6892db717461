"""Sizes and sequence bookkeeping shared by every kernel launch of one NSA call.

Kernels see tokens flattened: q [B*T, HQ, D], k/v [B*T, H, D], position p = b * T + t (or
the packed position with cu_seqlens). Block summaries are flattened the same way:
k_cmp/v_cmp [num_summaries, H, D], the summaries of sequence n at rows
[summary_offsets[n], summary_offsets[n + 1]).

Query rows: a program of the compressed, selection and selected kernels holds the query heads
of one kv head for a few consecutive queries as the rows of one tile: row r is query
t0 + r // GROUP_PAD, head kv_head * GROUP + r % GROUP_PAD (GROUP_PAD the group size rounded
up to a power of two; the padding rows are masked). Any group size fits, and a group of 1
still fills the 16 rows a tensor-core product needs, with 16 queries.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.triton_support import cdiv, next_power_of_2

__all__ = ["SequenceLayout"]


class SequenceLayout:
    """Everything the launches derive from (q, k, block_size, cu_seqlens), computed once."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor | None):
        self.batch, self.seqlen, self.num_q_heads, self.head_dim = q.shape
        self.num_kv_heads = k.shape[2]
        self.group = self.num_q_heads // self.num_kv_heads
        self.group_pad = next_power_of_2(self.group)
        self.block_d = max(16, next_power_of_2(self.head_dim))
        self.block_size = block_size
        self.varlen = cu_seqlens is not None
        if self.varlen:
            bounds = cu_seqlens.tolist()
            lengths = [b - a for a, b in zip(bounds, bounds[1:])]
            self.num_seqs = len(lengths)
            self.cu_seqlens = cu_seqlens
            summaries = [n // block_size for n in lengths]
            offsets = [0]
            for count in summaries:
                offsets.append(offsets[-1] + count)
            self.summary_offsets = torch.tensor(offsets, dtype=torch.int32, device=q.device)
            self.max_seqlen = max(lengths) if lengths else 0
        else:
            lengths = [self.seqlen] * self.batch
            self.num_seqs = self.batch
            self.cu_seqlens = None
            self.summary_offsets = None
            self.max_seqlen = self.seqlen
        self.lengths = lengths
        # Summaries of one sequence (non-varlen: every sequence has T // block_size).
        self.summaries_per_seq = self.seqlen // block_size
        self.num_summaries = sum(n // block_size for n in lengths)
        self.max_summaries = self.max_seqlen // block_size
        self.max_blocks = cdiv(self.max_seqlen, block_size)
        self.device = q.device

    def grid(self, queries_per_program: int) -> tuple[int, int, int]:
        """One program per tile of consecutive queries, sequence and kv head."""
        return (cdiv(max(self.max_seqlen, 1), queries_per_program), self.num_seqs, self.num_kv_heads)

    def sequence_ids(self) -> torch.Tensor:
        """[B*T] int64: the sequence each flattened token belongs to."""
        if not self.varlen:
            return torch.arange(self.batch, device=self.device).repeat_interleave(self.seqlen)
        lengths = torch.tensor(self.lengths, device=self.device)
        return torch.arange(self.num_seqs, device=self.device).repeat_interleave(lengths, output_size=self.seqlen)
