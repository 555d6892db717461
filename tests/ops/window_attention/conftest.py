"""Inputs, backends and the rule check (docs/correctness.md) shared by the window attention
tests: the op, its kernel variants, shorter queries, the lse gradient, the gate flux, the chunk
sums and the fused gate op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatedfwa import gated_window_attention
from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.window_attention import launch
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention
from gatedfwa.ops.window_attention.torch_path import chunked_gated_window_attention
from gatedfwa.testing import assert_within_rule, float32_slack


def _make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, gate, dtype, device, gate_scale=1.0):
    q = torch.randn(batch, seqlen, q_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype)
    g = None
    if gate:
        # Gates spread from nearly 0 (little decay) to a few units (strong decay).
        g = F.logsigmoid(torch.randn(batch, seqlen, q_heads, device=device) * 2 + 1) * gate_scale
        g = g.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return q, k, v, g


def _run_with_grads(fn, q, k, v, g, do, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    gate = None if g is None else g.detach().clone().requires_grad_()
    o, lse = fn(*leaves, gate, **kwargs)
    inputs = leaves + ([gate] if gate is not None else [])
    grads = torch.autograd.grad(o, inputs, do)
    return o.detach(), lse.detach(), grads


def _triton_op(q, k, v, g, window_size, cu_seqlens):
    return gated_window_attention(q, k, v, g, window_size=window_size, cu_seqlens=cu_seqlens, return_lse=True)


def _chunked_op(q, k, v, g, window_size, cu_seqlens):
    return chunked_gated_window_attention(q, k, v, g, window_size=window_size, cu_seqlens=cu_seqlens)


def _naive_op(q, k, v, g, window_size, cu_seqlens):
    return naive_gated_window_attention(q, k, v, g, window_size=window_size, cu_seqlens=cu_seqlens)


def _check_against_reference(fast_fn, q, k, v, g, window_size, cu_seqlens=None):
    """Run fast_fn, the naive path in q's precision and in float64; apply the rule to o, lse
    and every gradient (float32 slack: gatedfwa.testing.float32_slack)."""
    do = torch.randn_like(q)
    fast = _run_with_grads(fast_fn, q, k, v, g, do, window_size=window_size, cu_seqlens=cu_seqlens)
    low = _run_with_grads(_naive_op, q, k, v, g, do, window_size=window_size, cu_seqlens=cu_seqlens)
    as64 = [x.double() for x in (q, k, v)] + [None if g is None else g.double()]
    ref = _run_with_grads(_naive_op, *as64, do.double(), window_size=window_size, cu_seqlens=cu_seqlens)

    def slack(reference):
        return float32_slack(reference, q.dtype)

    assert_within_rule("o", fast[0], low[0], ref[0], atol=slack(ref[0]))
    assert_within_rule("lse", fast[1], low[1], ref[1], atol=slack(ref[1]))
    for name, a, b, c in zip(("dq", "dk", "dv", "dg"), fast[2], low[2], ref[2]):
        assert_within_rule(name, a, b, c, atol=slack(c))
    return fast


@pytest.fixture
def make_inputs():
    """make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, gate, dtype, device,
    gate_scale=1.0) -> (q, k, v, g): random q [B, T, HQ, D], k, v [B, T, H, D], and with gate
    log gates g [B, T, HQ] float32 (float64 for float64 inputs) from ~0 to a few units, else None."""
    return _make_inputs


@pytest.fixture
def run_with_grads():
    """run_with_grads(fn, q, k, v, g, do, **kwargs) -> (o, lse, gradients of q, k, v[, g]) of
    fn(q, k, v, g, **kwargs) -> (o, lse) on fresh leaves, for the upstream gradient do."""
    return _run_with_grads


@pytest.fixture
def check_against_reference():
    """check_against_reference(fast_fn, q, k, v, g, window_size, cu_seqlens=None): the rule of
    docs/correctness.md on fast_fn's o, lse and every gradient against the naive path in q's
    precision and in float64; returns fast_fn's (o, lse, gradients)."""
    return _check_against_reference


@pytest.fixture
def triton_op():
    """The public op with return_lse (whichever backend is selected), as check_against_reference
    calls it: (q, k, v, g, window_size, cu_seqlens) -> (o, lse)."""
    return _triton_op


@pytest.fixture
def chunked_op():
    """The chunked PyTorch path, called as triton_op."""
    return _chunked_op


@pytest.fixture
def naive_op():
    """The quadratic reference (in its inputs' dtype), called as triton_op."""
    return _naive_op


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels and poison every output buffer with NaN."""
    monkeypatch.setattr(launch, "allocate_like", lambda x: torch.full_like(x, float("nan")))
    with use_backend("triton"):
        yield
