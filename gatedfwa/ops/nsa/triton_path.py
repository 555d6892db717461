"""The Triton path of nsa_attention: the kernels of compressed.py, selection.py and
selected.py composed with autograd.

    k_cmp, v_cmp = block means of k, v          pooling.py (PyTorch autograd)
    o_cmp, lse2  = compressed attention          _CompressedAttention (Triton fwd/bwd)
    indices      = top blocks from lse2          selection.py (no gradient: discrete)
    o_slc        = selected-block attention      _SelectedAttention (Triton fwd/bwd)
    o_swa        = gated window attention        the window op (its own kernels)
    o            = g_cmp o_cmp + g_slc o_slc + g_swa o_swa   (PyTorch autograd)

Gradients reach q, k, v (through the summaries too), g and the branch gates.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.nsa.compressed import compressed_backward, compressed_forward
from gatedfwa.ops.nsa.layout import SequenceLayout
from gatedfwa.ops.nsa.pooling import pool_block_summaries
from gatedfwa.ops.nsa.reference import combine_branches
from gatedfwa.ops.nsa.selected import selected_backward, selected_forward
from gatedfwa.ops.nsa.selection import select_blocks
from gatedfwa.ops.nsa.sliding import sliding_branch

__all__ = ["triton_nsa_attention"]


class _CompressedAttention(torch.autograd.Function):
    """(q [B, T, HQ, D], k_cmp/v_cmp [num_summaries, H, D]) -> (o_cmp, lse2 [B*T, HQ])."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, layout, scale):
        o, lse = compressed_forward(q, k_cmp, v_cmp, layout, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.layout, ctx.scale = layout, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk_cmp, dv_cmp = compressed_backward(do.contiguous(), q, k_cmp, v_cmp, o, lse, ctx.layout, ctx.scale)
        return dq, dk_cmp, dv_cmp, None, None


class _SelectedAttention(torch.autograd.Function):
    """(q [B, T, HQ, D], k/v [B, T, H, D], indices [B, T, H, S]) -> o_slc [B, T, HQ, D]."""

    @staticmethod
    def forward(ctx, q, k, v, indices, layout, scale):
        o, lse, inverted = selected_forward(q, k, v, indices, layout, scale)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.layout, ctx.scale, ctx.inverted = layout, scale, inverted  # inverted: internal, never modified
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, indices, o, lse = ctx.saved_tensors
        dq, dk, dv = selected_backward(do.contiguous(), q, k, v, indices, o, lse, ctx.layout, ctx.scale,
                                       ctx.inverted)
        ctx.inverted = None
        return dq, dk, dv, None, None, None


def triton_nsa_attention(q, k, v, g, g_cmp, g_slc, g_swa, block_size: int, block_counts: int,
                         window_size: int | None, scale: float, cu_seqlens, block_indices, want_indices: bool = False):
    """Arguments as nsa_attention, validated (block_indices canonical). Returns (o in q's
    dtype, block indices [B, T, H, S] int32 or None when neither needed nor wanted)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    layout = SequenceLayout(q, k, block_size, cu_seqlens)
    need_selection = block_indices is None and (g_slc is not None or want_indices)
    branches = []
    if g_cmp is not None or need_selection:
        k_cmp = pool_block_summaries(k, layout)
        v_cmp = pool_block_summaries(v, layout)
        if g_cmp is not None:
            o_cmp, lse = _CompressedAttention.apply(q, k_cmp, v_cmp, layout, scale)
            branches.append((g_cmp, o_cmp))
        else:
            with torch.no_grad():
                _, lse = compressed_forward(q, k_cmp.detach(), v_cmp.detach(), layout, scale)
        if need_selection:
            with torch.no_grad():
                block_indices = select_blocks(q.detach(), k_cmp.detach(), lse, layout, block_counts, scale)
    if g_slc is not None:
        branches.append((g_slc, _SelectedAttention.apply(q, k, v, block_indices, layout, scale)))
    if g_swa is not None:
        branches.append((g_swa, sliding_branch(q, k, v, g, window_size, scale, cu_seqlens)))
    return combine_branches(branches, torch.float32).to(q.dtype), block_indices
