"""The sliding branch of NSA: GatedFWA's window op, in one place so that the NSA package has a
single import of it. g are GatedFWA log gates [B, T, HQ] (None: plain sliding-window
attention); the window counts the query itself."""

from __future__ import annotations

import torch

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.window_attention import gated_window_attention
from gatedfwa.ops.window_attention.reference import naive_gated_window_attention

__all__ = ["sliding_branch", "naive_sliding_branch", "select_backend"]


def sliding_branch(q, k, v, g, window_size: int, scale: float, cu_seqlens) -> torch.Tensor:
    """o_swa [B, T, HQ, D] through the public window op (its own backend dispatch and autograd)."""
    return gated_window_attention(q, k, v, g, window_size=window_size, scale=scale, cu_seqlens=cu_seqlens)


def naive_sliding_branch(q, k, v, g, window_size: int, scale: float, cu_seqlens) -> torch.Tensor:
    """The window op's quadratic reference, in q's dtype (float64 included)."""
    gate = None if g is None else g.to(q.dtype)
    return naive_gated_window_attention(q, k, v, gate, window_size=window_size, scale=scale,
                                        cu_seqlens=cu_seqlens)[0]
