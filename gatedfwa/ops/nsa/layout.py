"""Sizes and sequence bookkeeping shared by every kernel launch of one NSA call.

Kernels see tokens flattened: q [B*T_q, HQ, D], k/v [B*T_k, H, D]; the token of row b at t
is b * T + t (or the packed position with cu_seqlens). Block summaries are flattened the same
way: k_cmp/v_cmp [num_summaries, H, D], the summaries of sequence n at rows
[summary_offsets[n], summary_offsets[n + 1]).

Fewer queries than keys (T_q <= T_k, or cu_seqlens_q beside cu_seqlens): a sequence with L_q
queries and L_k keys has its queries at its last key positions, query i at key position
L_k - L_q + i. Kernels work in key positions (blocks, visibility and the causal mask are key
positions) and read or write a query's rows (q, o, lse, do, dq, block indices) at
row = key position + shift, shift = q's end of the sequence minus k's (common/varlen.py,
query_bounds). Without fewer queries (fewer_queries False, a compile-time flag of the
kernels) shift is 0 and rows are key positions.

Query rows: a program of the compressed, selection and selected kernels holds the query heads
of one kv head for a few consecutive queries as the rows of one tile: row r is query
t0 + r // GROUP_PAD, head kv_head * GROUP + r % GROUP_PAD (GROUP_PAD the group size rounded
up to a power of two; the padding rows are masked). Any group size fits, and a group of 1
still fills the 16 rows a tensor-core product needs, with 16 queries.

With cu_seqlens the longest sequences and the summary offsets are read on the host once per
call; the custom ops of triton_path.py receive them (op_args) and rebuild the layout without
reading anything back (from_op_args).
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.triton_support import cdiv, next_power_of_2

__all__ = ["SequenceLayout"]


class SequenceLayout:
    """Everything the launches derive from (q [B, T_q, HQ, D], the kv heads, block_size,
    cu_seqlens of k, and with fewer queries than keys seqlen_k = T_k and cu_seqlens_q),
    computed once. max_seqlen, max_seqlen_q and summary_offsets, where given, are taken as
    they are (a custom op's arguments); otherwise, with cu_seqlens, they come from the lengths
    read on the host, summary_offsets when first asked for.

    Sizes: seqlen_q (T_q) and seqlen_k (T_k); max_seqlen and max_blocks are of k's sequences
    (blocks and summaries are made of keys), max_seqlen_q of q's (the grid of query tiles)."""

    def __init__(self, q: torch.Tensor, num_kv_heads: int, block_size: int, cu_seqlens: torch.Tensor | None,
                 max_seqlen: int | None = None, summary_offsets: torch.Tensor | None = None, *,
                 seqlen_k: int | None = None, cu_seqlens_q: torch.Tensor | None = None,
                 max_seqlen_q: int | None = None):
        self.batch, self.seqlen_q, self.num_q_heads, self.head_dim = q.shape
        self.seqlen_k = self.seqlen_q if seqlen_k is None else seqlen_k
        self.num_kv_heads = num_kv_heads
        self.group = self.num_q_heads // self.num_kv_heads
        self.group_pad = next_power_of_2(self.group)
        self.block_d = max(16, next_power_of_2(self.head_dim))
        self.block_size = block_size
        self.varlen = cu_seqlens is not None
        self.cu_seqlens = cu_seqlens
        self.cu_seqlens_q = cu_seqlens_q
        self.fewer_queries = self.seqlen_q != self.seqlen_k or cu_seqlens_q is not None
        self.device = q.device
        self._lengths = None
        self._lengths_q = None
        self._summary_offsets = summary_offsets
        if self.varlen:
            self.num_seqs = cu_seqlens.numel() - 1
            self.max_seqlen = max(self.lengths, default=0) if max_seqlen is None else max_seqlen
            if cu_seqlens_q is None:
                self.max_seqlen_q = self.max_seqlen
            else:
                self.max_seqlen_q = max(self.lengths_q, default=0) if max_seqlen_q is None else max_seqlen_q
        else:
            self.num_seqs = self.batch
            self.max_seqlen = self.seqlen_k
            self.max_seqlen_q = self.seqlen_q
        # Summaries of one sequence (non-varlen: every sequence has T_k // block_size).
        self.summaries_per_seq = self.seqlen_k // block_size
        self.max_summaries = self.max_seqlen // block_size
        self.max_blocks = cdiv(self.max_seqlen, block_size)

    def op_args(self) -> tuple:
        """What a custom op receives to rebuild this layout (from_op_args): (cu_seqlens,
        cu_seqlens_q, summary_offsets, max_seqlen, max_seqlen_q, seqlen_k, block_size)."""
        return (self.cu_seqlens, self.cu_seqlens_q, self.summary_offsets, self.max_seqlen, self.max_seqlen_q,
                self.seqlen_k, self.block_size)

    @classmethod
    def from_op_args(cls, q: torch.Tensor, num_kv_heads: int, cu_seqlens, cu_seqlens_q, summary_offsets, max_seqlen,
                     max_seqlen_q, seqlen_k, block_size) -> "SequenceLayout":
        return cls(q, num_kv_heads, block_size, cu_seqlens, max_seqlen, summary_offsets, seqlen_k=seqlen_k,
                   cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)

    @staticmethod
    def _read_lengths(cu_seqlens: torch.Tensor) -> list[int]:
        bounds = cu_seqlens.tolist()
        return [b - a for a, b in zip(bounds, bounds[1:])]

    @property
    def lengths(self) -> list[int]:
        """Every sequence's length in keys (read from cu_seqlens on the host, once)."""
        if self._lengths is None:
            self._lengths = self._read_lengths(self.cu_seqlens) if self.varlen else [self.seqlen_k] * self.batch
        return self._lengths

    @property
    def lengths_q(self) -> list[int]:
        """Every sequence's number of queries (cu_seqlens_q, else as lengths)."""
        if self._lengths_q is None:
            if self.cu_seqlens_q is not None:
                self._lengths_q = self._read_lengths(self.cu_seqlens_q)
            elif self.varlen:
                self._lengths_q = self.lengths
            else:
                self._lengths_q = [self.seqlen_q] * self.batch
        return self._lengths_q

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

    def sequence_pointers(self, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_seqlens, cu_seqlens_q) as kernel pointers; fallback stands in for an absent one
        (never read: VARLEN or FEWER_QUERIES is off, or cu_seqlens_q is k's)."""
        cu = self.cu_seqlens if self.varlen else fallback
        cu_q = self.cu_seqlens_q if self.cu_seqlens_q is not None else cu
        return cu, cu_q

    def grid(self, queries_per_program: int) -> tuple[int, int, int]:
        """One program per tile of consecutive queries, sequence and kv head."""
        return (cdiv(max(self.max_seqlen_q, 1), queries_per_program), self.num_seqs, self.num_kv_heads)

    def sequence_ids(self) -> torch.Tensor:
        """[B*T_q] int64: the sequence each flattened query token belongs to (on the device,
        nothing read back)."""
        if not self.varlen:
            return torch.arange(self.batch, device=self.device).repeat_interleave(self.seqlen_q)
        offsets = self.cu_seqlens if self.cu_seqlens_q is None else self.cu_seqlens_q
        lengths = (offsets[1:] - offsets[:-1]).long()
        return torch.arange(self.num_seqs, device=self.device).repeat_interleave(lengths, output_size=self.seqlen_q)
