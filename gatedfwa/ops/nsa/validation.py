"""Argument checks of nsa_attention. Each error names the argument and what was expected;
nothing is broadcast, truncated or clamped silently."""

from __future__ import annotations

import torch

from gatedfwa.ops.common.validation import (
    check_cu_seqlens, check_gate_like, check_positive_int, check_qkv, check_scale, check_window, format_shape,
)

__all__ = ["check_nsa_args", "canonical_block_indices"]


def check_nsa_args(q, k, v, g, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale, cu_seqlens,
                   block_indices) -> None:
    check_qkv(q, k, v)
    gate_shape = tuple(q.shape[:3])
    for name, gate in (("g", g), ("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_gate_like(gate, gate_shape, q.device, name=name)
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
    check_cu_seqlens(cu_seqlens, q)
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


def _positions_in_sequence(seqlen: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[T] position of every token inside its own sequence."""
    t = torch.arange(seqlen, device=device)
    if cu_seqlens is None:
        return t
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return t - torch.repeat_interleave(starts, lengths, output_size=seqlen)


def canonical_block_indices(block_indices: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor | None):
    """Given block_indices [B, T, H, S] -> int32, each row sorted ascending with -1 (no block)
    last, the order the kernels read. Checks (skipped under torch.compile) that every entry is
    -1 or a block of the query's own sequence at or before its own block, and that no row
    names a block twice (it would be counted twice)."""
    seqlen = block_indices.shape[1]
    none = torch.iinfo(torch.int32).max
    keyed = torch.where(block_indices >= 0, block_indices.long(), none)
    ascending = torch.sort(keyed, dim=-1).values
    if not torch.compiler.is_compiling():
        own_block = (_positions_in_sequence(seqlen, cu_seqlens, block_indices.device) // block_size)
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
