"""Inputs shared by the decode tests (the host-position op, the static step, chunked prefill)."""

from __future__ import annotations

import pytest
import torch


def _make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype, gated, gate_scale=1.0, device="cpu"):
    q = torch.randn(batch, seqlen, q_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, dtype=dtype, device=device)
    g = -torch.rand(batch, seqlen, q_heads, device=device) * gate_scale if gated else None
    return q, k, v, g


@pytest.fixture
def make_inputs():
    """make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype, gated, gate_scale=1.0,
    device="cpu") -> (q, k, v, g): a random stream q [B, T, HQ, D], k, v [B, T, H, D] and, when
    gated, log gates g [B, T, HQ] float32 uniform in [-gate_scale, 0] (else None)."""
    return _make_inputs
