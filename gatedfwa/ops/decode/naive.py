"""The float64 oracle of decoding, for tests: a decode step must give its tokens exactly what
the parallel op gives them at the end of the whole stream (op.py), so the oracle is the window
op's quadratic reference on the whole stream, at the decoded positions. Production code never
calls it.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.window_attention.naive import naive_gated_window_attention

__all__ = ["naive_decoded_outputs"]


def naive_decoded_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                          window_size: int | None, first: int = 0, scale: float | None = None) -> torch.Tensor:
    """o [B, T - first, HQ, D] in q's dtype: what decoding the tokens [first, T) of the stream
    q [B, T, HQ, D], k, v [B, T, H, D], g [B, T, HQ] (or None) after a prompt of `first`
    tokens gives, by the naive attention over the whole stream (in q's dtype: float64 for
    the reference, a lower precision for the rule of docs/correctness.md)."""
    gates = None if g is None else g.to(q.dtype)
    o, _ = naive_gated_window_attention(q, k, v, gates, window_size, scale)
    return o[:, first:]
