"""Argument checks of nsa_attention. Each error names the argument and what was expected;
nothing is broadcast, truncated or clamped silently."""

from __future__ import annotations

import torch

from gatedfwa.ops.common.validation import (
    check_gate_like, check_positive_int, check_qkv, check_scale, check_sequence_offsets, check_window, format_shape,
)

__all__ = ["check_nsa_args", "canonical_block_indices", "query_key_positions"]


def check_nsa_args(q, k, v, g, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale, cu_seqlens,
                   cu_seqlens_q, block_indices) -> None:
    """cu_seqlens: k's offsets, and q's unless cu_seqlens_q is given (as resolved by
    common/validation.py, resolve_sequence_offsets). q may have fewer positions than k."""
    check_qkv(q, k, v, allow_shorter_queries=True)
    # g covers key positions (the sliding branch's decays run over the keys, as in the window
    # op); the branch gates weigh each query's output.
    check_gate_like(g, (k.shape[0], k.shape[1], q.shape[2]), q.device, name="g")
    for name, gate in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_gate_like(gate, tuple(q.shape[:3]), q.device, name=name)
    if g_cmp is None and g_slc is None and g_swa is None:
        raise ValueError("at least one of the branch gates g_cmp, g_slc, g_swa must be given "
                         "(a branch whose gate is None is left out)")
    if g is not None and g_swa is None:
        raise ValueError("g (the log gates of the sliding branch) was given without g_swa; the sliding branch "
                         "runs only with its gate g_swa")
    check_positive_int("block_size", block_size)
    if isinstance(block_counts, torch.Tensor):
        raise TypeError("block_counts must be an int (the same number of blocks for every query); a per-query "
                        "tensor is not supported")
    check_positive_int("block_counts", block_counts)
    check_window(window_size, zero_means="no sliding branch")
    if g_swa is not None and window_size == 0:
        raise ValueError("window_size must be >= 1 (or None for full causal) when g_swa is given, got 0")
    check_scale(scale)
    check_sequence_offsets(q, k, cu_seqlens, cu_seqlens_q)
    if block_indices is not None:
        _check_block_indices_layout(block_indices, q, k, g_slc)


def _check_block_indices_layout(block_indices, q, k, g_slc) -> None:
    if not isinstance(block_indices, torch.Tensor):
        raise TypeError(f"block_indices must be a torch.Tensor or None, got {type(block_indices).__name__}")
    if block_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_indices must be int32 or int64, got {block_indices.dtype}")
    expected = [q.shape[0], q.shape[1], k.shape[2]]
    if block_indices.dim() != 4 or list(block_indices.shape[:3]) != expected or block_indices.shape[3] < 1:
        raise ValueError(f"block_indices must have shape [batch, seqlen, kv_heads, S] = {expected + ['S']} with "
                         f"S >= 1, got {format_shape(block_indices)}")
    if block_indices.device != q.device:
        raise ValueError(f"block_indices must be on q's device {q.device}, got {block_indices.device}")
    if g_slc is None:
        raise ValueError("block_indices were given but g_slc is None: only the selected branch uses them")


def query_key_positions(seqlen_q: int, seqlen_k: int, cu_seqlens: torch.Tensor | None,
                        cu_seqlens_q: torch.Tensor | None, device) -> torch.Tensor:
    """[T_q] int64: the key position of every query inside its own sequence, the queries
    being the last ones of their sequence (query i of m, with n keys, at n - m + i).
    cu_seqlens: k's offsets (and q's unless cu_seqlens_q is given)."""
    t = torch.arange(seqlen_q, device=device)
    if cu_seqlens is None:
        return t + (seqlen_k - seqlen_q)
    offsets_q = cu_seqlens if cu_seqlens_q is None else cu_seqlens_q
    starts = offsets_q[:-1].long()
    lengths_q = offsets_q[1:].long() - starts
    lengths_k = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    return t + torch.repeat_interleave(lengths_k - lengths_q - starts, lengths_q, output_size=seqlen_q)


def canonical_block_indices(block_indices: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor | None,
                            seqlen_k: int | None = None, cu_seqlens_q: torch.Tensor | None = None):
    """Given block_indices [B, T_q, H, S] -> int32, each row sorted ascending with -1 (no
    block) last, the order the kernels read. Checks (skipped under torch.compile) that every
    entry is -1 or a block of the query's own sequence at or before its own block (its key
    position // block_size; seqlen_k = T_k, default T_q), and that no row names a block twice
    (it would be counted twice)."""
    seqlen = block_indices.shape[1]
    none = torch.iinfo(torch.int32).max
    keyed = torch.where(block_indices >= 0, block_indices.long(), none)
    ascending = torch.sort(keyed, dim=-1).values
    if not torch.compiler.is_compiling():
        positions = query_key_positions(seqlen, seqlen if seqlen_k is None else seqlen_k, cu_seqlens, cu_seqlens_q,
                                        block_indices.device)
        own_block = positions // block_size
        own_block = own_block[None, :, None, None]
        named = ascending != none
        if bool(((block_indices < -1)).any()):
            raise ValueError("block_indices entries must be -1 (no block) or a block number >= 0")
        if bool((named & (ascending > own_block)).any()):
            raise ValueError("block_indices name a block after the query's own block (position // block_size); "
                             "a query may select only blocks at or before its own")
        if bool((named[..., 1:] & (ascending[..., 1:] == ascending[..., :-1])).any()):
            raise ValueError("block_indices name the same block twice for one query")
    return torch.where(ascending != none, ascending, -1).to(torch.int32).contiguous()
