"""The public NSA op: validation and backend dispatch.

Backends (as for the window op, gatedfwa/ops/window_attention/op.py):
    "triton"  the kernels of compressed.py, selection.py and selected.py (composed, with their
              custom ops, in triton_path.py); default for CUDA tensors. On CPU tensors they
              run under TRITON_INTERPRET=1 (tests).
    "torch"   torch_path.py; default elsewhere.
GATEDFWA_BACKEND=triton or GATEDFWA_BACKEND=torch forces one. The sliding branch is always
gatedfwa's window op, which dispatches the same way.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.common.validation import resolve_sequence_offsets
from gatedfwa.ops.nsa.torch_path import chunked_nsa_attention
from gatedfwa.ops.nsa.validation import canonical_block_indices, check_nsa_args

__all__ = ["nsa_attention"]


def nsa_attention(
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
    window_size: int | None = 512,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    return_block_indices: bool = False,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
):
    """Native Sparse Attention whose sliding branch is GatedFWA (docs/nsa.md).

    o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa, a branch whose gate is None left out:
    o_cmp attends to the mean of every complete block of block_size keys/values (causally: a
    block once complete); o_slc attends to the keys of the block_counts blocks each query
    selects from the compressed-attention probabilities, summed over the query heads of a kv
    head (block 0 and the query's own block always kept, the own block masked causally);
    o_swa is gatedfwa.gated_window_attention(q, k, v, g, window_size).

    q may hold fewer positions than k (T_q <= T_k: chunked prefill, speculative decoding, as in
    fla's tests of parallel_nsa(q[:, -T_q:], k, v, ...)): the queries are the last key
    positions of each sequence, query i of a sequence with L_q queries and L_k keys at key
    position L_k - L_q + i, and every branch reads that position (visible summaries, own
    block, causal mask, window). The result is the last T_q rows of the call with every query.

    Args:
        q: [B, T_q, HQ, D] float16, bfloat16 or float32, D <= 256; T_q <= T_k.
        k, v: [B, T_k, H, D], HQ % H == 0 (any group size).
        g: [B, T_k, HQ] GatedFWA log gates (<= 0) of the sliding branch, or None (plain SWA);
            they cover the key positions, as in gated_window_attention.
        g_cmp, g_slc, g_swa: [B, T_q, HQ] branch gates (meant in [0, 1], e.g. sigmoids), or None.
        block_size: tokens per block, for both the summaries and the selection.
        block_counts: blocks each query selects (an int; fewer exist early in a sequence).
        window_size: keys of the sliding window, the query included; None = full causal;
            0 = no sliding branch (then g_swa must be None).
        scale: logit scale, default D ** -0.5 (all branches).
        cu_seqlens: int32 [N + 1] offsets of N sequences packed along T (B must be 1), the
            same for q and k; blocks are counted from each sequence's start and nothing
            crosses a boundary.
        block_indices: [B, T_q, H, S] int32/int64 selected blocks to use instead of the
            computed selection (-1 = none; any order; each at or before the query's own
            block). Then S replaces block_counts.
        return_block_indices: also return the block indices used, [B, T_q, H, S] int32, each
            row ascending with -1 last.
        cu_seqlens_q, cu_seqlens_k: keyword only, instead of cu_seqlens when q's sequences are
            shorter than k's: [N + 1] offsets of the same N sequences in q (and the branch
            gates) and in k (v, g); sequence i has cu_seqlens_q[i+1] - cu_seqlens_q[i] <=
            cu_seqlens_k[i+1] - cu_seqlens_k[i] queries (0 allowed), aligned to its last keys.

    Returns:
        o [B, T_q, HQ, D] in q's dtype, or (o, block_indices) when return_block_indices.
    """
    cu_seqlens, cu_seqlens_q = resolve_sequence_offsets(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    check_nsa_args(q, k, v, g, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale, cu_seqlens,
                   cu_seqlens_q, block_indices)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if g_swa is None:
        window_size = 0
    if block_indices is not None:
        block_indices = canonical_block_indices(block_indices, block_size, cu_seqlens, k.shape[1], cu_seqlens_q)
    args = (q, k, v, g, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale, cu_seqlens, block_indices,
            return_block_indices)
    if select_backend(q.device) == "triton":
        from gatedfwa.ops.nsa.triton_path import triton_nsa_attention

        o, indices = triton_nsa_attention(*args, cu_seqlens_q=cu_seqlens_q)
    else:
        o, indices = chunked_nsa_attention(*args, cu_seqlens_q=cu_seqlens_q)
    return (o, indices) if return_block_indices else o
