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

With cu_seqlens the longest sequence and the summary offsets are read on the host once per
call; the custom ops of triton_path.py receive them (max_seqlen, summary_offsets) and rebuild
the layout without reading anything back.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.triton_support import cdiv, next_power_of_2

__all__ = ["SequenceLayout"]


class SequenceLayout:
    """Everything the launches derive from (q [B, T, HQ, D], the kv heads, block_size,
    cu_seqlens), computed once. max_seqlen and summary_offsets, where given, are taken as they
    are (a custom op's arguments); otherwise, with cu_seqlens, they come from the lengths read
    on the host, summary_offsets when first asked for."""

    def __init__(self, q: torch.Tensor, num_kv_heads: int, block_size: int, cu_seqlens: torch.Tensor | None,
                 max_seqlen: int | None = None, summary_offsets: torch.Tensor | None = None):
        self.batch, self.seqlen, self.num_q_heads, self.head_dim = q.shape
        self.num_kv_heads = num_kv_heads
        self.group = self.num_q_heads // self.num_kv_heads
        self.group_pad = next_power_of_2(self.group)
        self.block_d = max(16, next_power_of_2(self.head_dim))
        self.block_size = block_size
        self.varlen = cu_seqlens is not None
        self.cu_seqlens = cu_seqlens
        self.device = q.device
        self._lengths = None
        self._summary_offsets = summary_offsets
        if self.varlen:
            self.num_seqs = cu_seqlens.numel() - 1
            self.max_seqlen = max(self.lengths, default=0) if max_seqlen is None else max_seqlen
        else:
            self.num_seqs = self.batch
            self.max_seqlen = self.seqlen
        # Summaries of one sequence (non-varlen: every sequence has T // block_size).
        self.summaries_per_seq = self.seqlen // block_size
        self.max_summaries = self.max_seqlen // block_size
        self.max_blocks = cdiv(self.max_seqlen, block_size)

    @property
    def lengths(self) -> list[int]:
        """Every sequence's length (read from cu_seqlens on the host, once)."""
        if self._lengths is None:
            if self.varlen:
                bounds = self.cu_seqlens.tolist()
                self._lengths = [b - a for a, b in zip(bounds, bounds[1:])]
            else:
                self._lengths = [self.seqlen] * self.batch
        return self._lengths

    @property
    def summary_offsets(self) -> torch.Tensor | None:
        """int32 [N + 1] with cu_seqlens: sequence n's summaries are the rows
        [summary_offsets[n], summary_offsets[n + 1]) of k_cmp (computed once from the lengths,
        where not given); None without cu_seqlens."""
        if self.varlen and self._summary_offsets is None:
            offsets = [0]
            for n in self.lengths:
                offsets.append(offsets[-1] + n // self.block_size)
            self._summary_offsets = torch.tensor(offsets, dtype=torch.int32, device=self.device)
        return self._summary_offsets

    def grid(self, queries_per_program: int) -> tuple[int, int, int]:
        """One program per tile of consecutive queries, sequence and kv head."""
        return (cdiv(max(self.max_seqlen, 1), queries_per_program), self.num_seqs, self.num_kv_heads)

    def sequence_ids(self) -> torch.Tensor:
        """[B*T] int64: the sequence each flattened token belongs to (on the device, nothing
        read back)."""
        if not self.varlen:
            return torch.arange(self.batch, device=self.device).repeat_interleave(self.seqlen)
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.arange(self.num_seqs, device=self.device).repeat_interleave(lengths, output_size=self.seqlen)
