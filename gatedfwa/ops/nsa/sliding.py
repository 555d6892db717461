"""The sliding branch of NSA: GatedFWA's window op, in one place so that the NSA package has a
single import of it. g are GatedFWA log gates [B, T, HQ] (None: plain sliding-window
attention); the window counts the query itself."""

from __future__ import annotations

import torch

from gatedfwa.ops.window_attention import gated_window_attention

__all__ = ["sliding_branch"]


def sliding_branch(q, k, v, g, window_size: int, scale: float, cu_seqlens, cu_seqlens_q=None) -> torch.Tensor:
    """o_swa [B, T_q, HQ, D] through the public window op (its own backend dispatch and
    autograd). cu_seqlens delimits k's sequences, and q's unless cu_seqlens_q is given; with
    T_q < T_k the queries are the last key positions (the window op's convention)."""
    if cu_seqlens_q is not None:
        return gated_window_attention(q, k, v, g, window_size=window_size, scale=scale, cu_seqlens_q=cu_seqlens_q,
                                      cu_seqlens_k=cu_seqlens)
    return gated_window_attention(q, k, v, g, window_size=window_size, scale=scale, cu_seqlens=cu_seqlens)
