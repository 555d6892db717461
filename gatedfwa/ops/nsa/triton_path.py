"""The Triton path of nsa_attention: the kernels of compressed.py, selection.py and
selected.py composed with autograd.

    k_cmp, v_cmp = block means of k, v          pooling.py (PyTorch autograd)
    o_cmp, lse2  = compressed attention          the KernelOp _compressed (Triton fwd/bwd)
    indices      = top blocks from lse2          the KernelOp _selection (no gradient: discrete)
    o_slc        = selected-block attention      the KernelOp _selected (Triton fwd/bwd)
    o_swa        = gated window attention        the window op (its own kernels)
    o            = g_cmp o_cmp + g_slc o_slc + g_swa o_swa   (PyTorch autograd)

The two attention branches are KernelOps (gatedfwa/ops/common/custom_op.py): custom ops with
a registered backward, which torch.compile sees as opaque nodes, and an autograd.Function for
eager calls; the selection is one without a backward. Without cu_seqlens the whole path
compiles as one graph (fullgraph); with it, the lengths are read on the host first. A custom
op takes tensors and numbers only, so each receives what its SequenceLayout is made of
(SequenceLayout.op_args: cu_seqlens of k and of q, the summary offsets, the longest
sequences, T_k, the block size) and rebuilds it without reading anything back, and the
selected branch receives the inverted selection of a block-major call as three tensors (the
backward reuses it).

q may hold fewer queries than k holds keys (T_q <= T_k, or cu_seqlens_q): the queries are
the last key positions of each sequence (layout.py); every kernel takes the layout's
FEWER_QUERIES flag.

Gradients reach q, k, v (through the summaries too), g and the branch gates.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.custom_op import KernelOp
from gatedfwa.ops.nsa.compressed import compressed_backward, compressed_forward
from gatedfwa.ops.nsa.layout import SequenceLayout
from gatedfwa.ops.nsa.pooling import pool_block_summaries
from gatedfwa.ops.nsa.rules import combine_branches
from gatedfwa.ops.nsa.selected import block_major, selected_backward, selected_forward
from gatedfwa.ops.nsa.selected_block_major import InvertedSelection, invert_selection
from gatedfwa.ops.nsa.selection import select_blocks
from gatedfwa.ops.nsa.sliding import sliding_branch

__all__ = ["triton_nsa_attention"]


def _row_statistics_like(q: torch.Tensor) -> torch.Tensor:
    """An empty lse2 [B*T_q, HQ] float32 for q [B, T_q, HQ, D]."""
    return q.new_empty((q.shape[0] * q.shape[1], q.shape[2]), dtype=torch.float32)


def _lse_output(inputs, output):
    return (output[1],)


# --------------------------------------------------------------------------------------
# The compressed branch: (q [B, T_q, HQ, D], k_cmp/v_cmp [num_summaries, H, D]) -> (o_cmp, lse2 [B*T_q, HQ])
# --------------------------------------------------------------------------------------


def _compressed_forward(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, cu_seqlens: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, summary_offsets: torch.Tensor | None, max_seqlen: int, max_seqlen_q: int,
    seqlen_k: int, block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_cmp [B, T_q, HQ, D], lse2 [B*T_q, HQ] float32); the layout's parts as
    SequenceLayout.op_args gives them."""
    layout = SequenceLayout.from_op_args(q, k_cmp.shape[1], cu_seqlens, cu_seqlens_q, summary_offsets, max_seqlen,
                                         max_seqlen_q, seqlen_k, block_size)
    return compressed_forward(q, k_cmp, v_cmp, layout, scale)


def _compressed_fake(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_q, summary_offsets, max_seqlen, max_seqlen_q, seqlen_k,
                     block_size, scale):
    return torch.empty_like(q), _row_statistics_like(q)


def _compressed_backward(
    do: torch.Tensor, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None, summary_offsets: torch.Tensor | None,
    max_seqlen: int, max_seqlen_q: int, seqlen_k: int, block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk_cmp, dv_cmp) in the inputs' dtypes."""
    layout = SequenceLayout.from_op_args(q, k_cmp.shape[1], cu_seqlens, cu_seqlens_q, summary_offsets, max_seqlen,
                                         max_seqlen_q, seqlen_k, block_size)
    return compressed_backward(do, q, k_cmp, v_cmp, o, lse, layout, scale)


def _compressed_backward_fake(do, q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens_q, summary_offsets, max_seqlen,
                              max_seqlen_q, seqlen_k, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k_cmp), torch.empty_like(v_cmp)


def _compressed_save(ctx, inputs, output):
    q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_q, summary_offsets, max_seqlen, max_seqlen_q, seqlen_k, block_size, \
        scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens_q, summary_offsets)
    ctx.sizes = (max_seqlen, max_seqlen_q, seqlen_k, block_size, scale)


def _compressed_gradients(ctx, backward, do, dlse):
    """(dq, dk_cmp, dv_cmp, then None for every other input); lse2 feeds only the selection,
    which takes no gradient."""
    q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens_q, summary_offsets = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do.contiguous()
    dq, dk_cmp, dv_cmp = backward(do, q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens_q, summary_offsets, *ctx.sizes)
    return dq, dk_cmp, dv_cmp, None, None, None, None, None, None, None, None


_compressed = KernelOp(
    "gatedfwa::nsa_compressed_attention", _compressed_forward, _compressed_fake, backward=_compressed_backward,
    backward_fake=_compressed_backward_fake, save=_compressed_save, gradients=_compressed_gradients,
    non_differentiable=_lse_output,
)


# --------------------------------------------------------------------------------------
# The selected branch: (q [B, T_q, HQ, D], k/v [B, T_k, H, D], indices [B, T_q, H, S]) -> (o_slc, lse2)
# --------------------------------------------------------------------------------------


def _inverted(queries, offsets, kv_heads) -> InvertedSelection | None:
    return None if queries is None else InvertedSelection(queries, offsets, kv_heads)


def _selected_layout(q, k, cu_seqlens, cu_seqlens_q, max_seqlen, max_seqlen_q, block_size) -> SequenceLayout:
    return SequenceLayout(q, k.shape[2], block_size, cu_seqlens, max_seqlen, seqlen_k=k.shape[1],
                          cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)


def _selected_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, cu_seqlens: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, max_seqlen: int, max_seqlen_q: int, block_size: int, scale: float,
    queries: torch.Tensor | None, offsets: torch.Tensor | None, kv_heads: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_slc [B, T_q, HQ, D], lse2 [B*T_q, HQ] float32). queries, offsets, kv_heads: the
    inverted selection (selected_block_major.InvertedSelection) of a block-major call, or None."""
    layout = _selected_layout(q, k, cu_seqlens, cu_seqlens_q, max_seqlen, max_seqlen_q, block_size)
    return selected_forward(q, k, v, indices, layout, scale, _inverted(queries, offsets, kv_heads))


def _selected_fake(q, k, v, indices, cu_seqlens, cu_seqlens_q, max_seqlen, max_seqlen_q, block_size, scale, queries,
                   offsets, kv_heads):
    return torch.empty_like(q), _row_statistics_like(q)


def _selected_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None, max_seqlen: int,
    max_seqlen_q: int, block_size: int, scale: float, queries: torch.Tensor | None, offsets: torch.Tensor | None,
    kv_heads: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes."""
    layout = _selected_layout(q, k, cu_seqlens, cu_seqlens_q, max_seqlen, max_seqlen_q, block_size)
    return selected_backward(do, q, k, v, indices, o, lse, layout, scale, _inverted(queries, offsets, kv_heads))


def _selected_backward_fake(do, q, k, v, indices, o, lse, cu_seqlens, cu_seqlens_q, max_seqlen, max_seqlen_q,
                            block_size, scale, queries, offsets, kv_heads):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _selected_save(ctx, inputs, output):
    q, k, v, indices, cu_seqlens, cu_seqlens_q, max_seqlen, max_seqlen_q, block_size, scale, queries, offsets, \
        kv_heads = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, indices, o, lse, cu_seqlens, cu_seqlens_q, queries, offsets, kv_heads)
    ctx.sizes = (max_seqlen, max_seqlen_q, block_size, scale)


def _selected_gradients(ctx, backward, do, dlse):
    """(dq, dk, dv, then None for every other input): the indices are discrete."""
    q, k, v, indices, o, lse, cu_seqlens, cu_seqlens_q, queries, offsets, kv_heads = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do.contiguous()
    dq, dk, dv = backward(do, q, k, v, indices, o, lse, cu_seqlens, cu_seqlens_q, *ctx.sizes, queries, offsets,
                          kv_heads)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_selected = KernelOp(
    "gatedfwa::nsa_selected_attention", _selected_forward, _selected_fake, backward=_selected_backward,
    backward_fake=_selected_backward_fake, save=_selected_save, gradients=_selected_gradients,
    non_differentiable=_lse_output,
)


# --------------------------------------------------------------------------------------
# The selection: top block_counts blocks per query and kv head, no gradient (discrete)
# --------------------------------------------------------------------------------------


def _select(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, summary_offsets: torch.Tensor | None, max_seqlen: int, max_seqlen_q: int,
    seqlen_k: int, block_size: int, block_counts: int, scale: float,
) -> torch.Tensor:
    """Block indices [B, T_q, H, block_counts] int32 (ascending, -1 last) from the compressed
    branch's lse2 [B*T_q, HQ]."""
    layout = SequenceLayout.from_op_args(q, k_cmp.shape[1], cu_seqlens, cu_seqlens_q, summary_offsets, max_seqlen,
                                         max_seqlen_q, seqlen_k, block_size)
    return select_blocks(q, k_cmp, lse, layout, block_counts, scale)


def _select_fake(q, k_cmp, lse, cu_seqlens, cu_seqlens_q, summary_offsets, max_seqlen, max_seqlen_q, seqlen_k,
                 block_size, block_counts, scale):
    return q.new_empty((q.shape[0], q.shape[1], k_cmp.shape[1], block_counts), dtype=torch.int32)


_selection = KernelOp("gatedfwa::nsa_select_blocks", _select, _select_fake)


def triton_nsa_attention(q, k, v, g, g_cmp, g_slc, g_swa, block_size: int, block_counts: int,
                         window_size: int | None, scale: float, cu_seqlens, block_indices, want_indices: bool = False,
                         cu_seqlens_q=None):
    """Arguments as nsa_attention, validated (block_indices canonical; cu_seqlens: k's, and q's
    unless cu_seqlens_q is given). Returns (o [B, T_q, HQ, D] in q's dtype, block indices
    [B, T_q, H, S] int32 or None when neither needed nor wanted)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    layout = SequenceLayout(q, k.shape[2], block_size, cu_seqlens, seqlen_k=k.shape[1], cu_seqlens_q=cu_seqlens_q)
    parts = (*layout.op_args(), scale)
    need_selection = block_indices is None and (g_slc is not None or want_indices)
    branches = []
    if g_cmp is not None or need_selection:
        k_cmp = pool_block_summaries(k, layout)
        v_cmp = pool_block_summaries(v, layout)
        if g_cmp is not None:
            o_cmp, lse = _compressed(q, k_cmp, v_cmp, *parts)
            branches.append((g_cmp, o_cmp))
        else:
            with torch.no_grad():
                _, lse = _compressed(q.detach(), k_cmp.detach(), v_cmp.detach(), *parts)
        if need_selection:
            with torch.no_grad():
                block_indices = _selection(q.detach(), k_cmp.detach(), lse.detach(), *layout.op_args(), block_counts,
                                           scale)
    if g_slc is not None:
        inverted = (None, None, None)
        # A block-major forward walks the inverted selection and the backward reuses it. Its
        # size depends on the indices' values, which a compiled graph cannot hold between the
        # custom ops: there each builds its own.
        if q.numel() > 0 and block_major(layout) and not torch.compiler.is_compiling():
            inverted = tuple(invert_selection(block_indices, layout))
        o_slc, _ = _selected(q, k, v, block_indices, cu_seqlens, cu_seqlens_q, layout.max_seqlen, layout.max_seqlen_q,
                             block_size, scale, *inverted)
        branches.append((g_slc, o_slc))
    if g_swa is not None:
        branches.append((g_swa, sliding_branch(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q)))
    return combine_branches(branches, torch.float32).to(q.dtype), block_indices
