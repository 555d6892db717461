"""Gradients through the log-sum-exp that ``return_lse=True`` returns.

lse_t = log sum_j exp(s_tj) is differentiable (d lse_t / d s_tj = p_tj): a loss that uses it
(merging partial attentions, an auxiliary z-loss) must get its gradient from every backend.
The Triton kernels (the interpreter on the CPU, the GPU with GATEDFWA_TEST_DEVICE=cuda), the
fused gate + attention op and the compiled custom ops are checked against the float64 naive
reference under the rule of docs/correctness.md, for a loss that uses o and lse, and one that
uses lse alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatedfwa import gated_fwa_attention, gated_window_attention
from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention
from gatedfwa.testing import assert_within_rule, float32_slack


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    with use_backend(request.param):
        yield request.param


def _inputs(device, dtype, batch=1, seqlen_q=37, seqlen_k=37, q_heads=4, kv_heads=2, head_dim=16):
    q = torch.randn(batch, seqlen_q, q_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(batch, seqlen_k, q_heads, device=device) * 2 + 1)
    return q, k, v, g


def _grads(fn, tensors, do, dlse):
    """Gradients of sum(o * do) + sum(lse * dlse) (do None: lse alone) w.r.t. tensors."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    o, lse = fn(*leaves)
    loss = (lse.double() * dlse).sum()
    if do is not None:
        loss = loss + (o.double() * do).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # lse alone does not depend on v
    return [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)]


def _check(fast_fn, naive_fn, tensors, o_shape, lse_shape, with_o, names, through_gate=()):
    device = tensors[0].device
    do = torch.randn(o_shape, device=device, dtype=torch.float64) if with_o else None
    dlse = torch.randn(lse_shape, device=device, dtype=torch.float64)
    fast = _grads(fast_fn, tensors, do, dlse)
    low = _grads(naive_fn, tensors, do, dlse)
    ref = _grads(naive_fn, [t.double() for t in tensors], do, dlse)
    for name, a, b, c in zip(names, fast, low, ref):
        if c.abs().sum() > 0:
            assert a.abs().sum() > 0, f"{name}: no gradient reached it"
        # Gradients that reach the gate projection get ten times the slack, as in
        # tests/ops/window_attention/test_fused_gate.py: the kernels' dg is assembled from float32 sums of dS.
        slack = float32_slack(c, tensors[0].dtype) * (10 if name in through_gate else 1)
        assert_within_rule(name, a, b, c, atol=slack)


@pytest.mark.parametrize("gated, with_o", [(True, True), (True, False), (False, True)],
                         ids=["gate-o-and-lse", "gate-lse-only", "nogate-o-and-lse"])
def test_lse_gradient_window_op(backend, device, gated, with_o):
    q, k, v, g = _inputs(device, torch.float32)
    tensors = [q, k, v] + ([g] if gated else [])

    def fast(q, k, v, g=None):
        return gated_window_attention(q, k, v, g, window_size=12, return_lse=True)

    def naive(q, k, v, g=None):
        return naive_gated_window_attention(q, k, v, g, window_size=12)

    _check(fast, naive, tensors, q.shape, (1, 4, 37), with_o, ("dq", "dk", "dv", "dg"))


def test_lse_gradient_bf16(backend, device):
    q, k, v, g = _inputs(device, torch.bfloat16)

    def fast(q, k, v, g):
        return gated_window_attention(q, k, v, g, window_size=20, return_lse=True)

    def naive(q, k, v, g):
        return naive_gated_window_attention(q, k, v, g, window_size=20)

    _check(fast, naive, [q, k, v, g], q.shape, (1, 4, 37), True, ("dq", "dk", "dv", "dg"))


def test_lse_gradient_packed_and_fewer_queries(backend, device):
    """Packed sequences with fewer queries than keys (cu_seqlens_q / cu_seqlens_k)."""
    cu_q = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 18, 25, 44], dtype=torch.int32, device=device)
    q, k, v, g = _inputs(device, torch.float32, seqlen_q=20, seqlen_k=44)

    def fast(q, k, v, g):
        return gated_window_attention(q, k, v, g, window_size=9, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    def naive(q, k, v, g):
        return naive_gated_window_attention(q, k, v, g, window_size=9, cu_seqlens=cu_k, cu_seqlens_q=cu_q)

    _check(fast, naive, [q, k, v, g], q.shape, (1, 4, 20), True, ("dq", "dk", "dv", "dg"))


def test_lse_gradient_fused_gate_op(backend, device):
    """gated_fwa_attention: the lse's gradient alone reaches q, k, x, the gate weight and
    bias (the fused op's backward runs with a zero output gradient)."""
    q, k, v, _ = _inputs(device, torch.float32)
    x = torch.randn(1, 37, 24, device=device)
    weight = torch.randn(8, 24, device=device) / 24**0.5
    bias = torch.randn(4, device=device) + 2

    def fast(q, k, v, x, weight, bias):
        return gated_fwa_attention(q, k, v, x, weight, bias, window_size=12, return_lse=True)

    def naive(q, k, v, x, weight, bias):
        a, beta_pre = F.linear(x, weight).split(4, dim=-1)
        beta = 1 + F.elu(beta_pre)
        g = F.logsigmoid(beta * (a + bias)) / beta
        return naive_gated_window_attention(q, k, v, g, window_size=12)

    _check(fast, naive, [q, k, v, x, weight, bias], q.shape, (1, 4, 37), False,
           ("dq", "dk", "dv", "dx", "dweight", "dbias"), through_gate=("dx", "dweight", "dbias"))


def test_lse_gradient_compiled_custom_op(device):
    """Under torch.compile the custom ops carry the lse's gradient: the compiled Triton path
    agrees with the PyTorch path, whose lse is differentiable by construction."""
    q, k, v, g = _inputs(device, torch.float32, seqlen_q=29, seqlen_k=29)
    dlse = torch.randn(1, 4, 29, device=device)

    def loss(q, k, v, g):
        o, lse = gated_window_attention(q, k, v, g, window_size=12, return_lse=True)
        return o.square().mean() + (lse * dlse).sum()

    with use_backend("torch"):
        reference_leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
        loss(*reference_leaves).backward()
    with use_backend("triton"):
        compiled_leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
        torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled_leaves).backward()
    for a, b in zip(compiled_leaves, reference_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
