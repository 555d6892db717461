"""The gate and the attention as one op (gatedfwa/ops/window_attention/fused_gate.py:
gated_fwa_attention, gate_attention_from_projection): output, lse and the gradients of q, k, v,
x, the gate weight and bias against the float64 composition of the reference pieces (the
projection, the gate's formula, the naive attention) with the rule of docs/correctness.md, on
both backends; the custom ops' schema and eager path; the errors. Every registered gate goes
through the same op in tests/ops/gate/test_gate_kinds.py.
"""

from __future__ import annotations

import pytest
import torch

from gatedfwa import gated_fwa_attention, log_gates_from_projection
from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.gate import launch as gate_launch
from gatedfwa.ops.gate.naive import naive_log_gates_from_projection
from gatedfwa.ops.window_attention import fused_gate
from gatedfwa.ops.window_attention.fused_gate import gate_attention_from_projection
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention
from gatedfwa.ops.window_attention.torch_path import chunked_gated_window_attention
from gatedfwa.testing import assert_within_rule, float32_slack


def composite_reference(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
    """The composition of the reference pieces in the inputs' dtype: projection, formula,
    naive quadratic attention."""
    gate_pre = x @ gate_weight.t()
    g = naive_log_gates_from_projection(gate_pre, gate_bias)
    return naive_gated_window_attention(q, k, v, g.to(q.dtype), window_size=window_size, cu_seqlens=cu_seqlens)


def projection_attention_inputs(batch, seqlen, q_heads, kv_heads, head_dim, hidden, device):
    """Inputs of gate + attention from a projection: ((q, k, v, x [B, T, hidden], gate_weight
    [2 HQ, hidden], gate_bias [HQ]), do [B, T, HQ, D] float64)."""
    q = torch.randn(batch, seqlen, q_heads, head_dim, device=device)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=device)
    x = torch.randn(batch, seqlen, hidden, device=device)
    gate_weight = torch.randn(2 * q_heads, hidden, device=device) / hidden**0.5
    gate_bias = torch.randn(q_heads, device=device) + 2
    do = torch.randn(q.shape, dtype=torch.float64, device=device)
    return (q, k, v, x, gate_weight, gate_bias), do


def composite_grads(fn, inputs, do, window_size, cu_seqlens):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    o, lse = fn(*leaves, window_size, cu_seqlens)
    grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
    return (o.detach(), lse.detach(), *grads)


def run_composite(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
    return gated_fwa_attention(
        q, k, v, x, gate_weight, gate_bias, window_size=window_size, cu_seqlens=cu_seqlens, return_lse=True
    )


@pytest.mark.parametrize(
    "batch, window_size, cu_seqlens",
    [(2, 8, None), (2, None, None), (1, 8, [0, 13, 13, 29, 40]), (1, None, [0, 13, 13, 29, 40])],
    ids=["w8", "full", "w8-varlen", "full-varlen"],
)
@use_backend("torch")
def test_gated_fwa_attention(batch, window_size, cu_seqlens, device):
    """Torch attention backend (the Triton attention kernels have their own tests): output,
    lse and the gradients of q, k, v, x, gate_weight and gate_bias against the float64
    composition of the reference pieces."""
    seqlen, q_heads, kv_heads, head_dim, model_dim = 40, 4, 2, 16, 32
    q = torch.randn(batch, seqlen, q_heads, head_dim, device=device)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=device)
    x = torch.randn(batch, seqlen, model_dim, device=device)
    gate_weight = torch.randn(2 * q_heads, model_dim, device=device) / model_dim**0.5
    gate_bias = torch.randn(q_heads, device=device) + 2  # gates from ~0 to a few units of decay
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    inputs = (q, k, v, x, gate_weight, gate_bias)
    do = torch.randn(q.shape, dtype=torch.float64, device=device)
    fast = composite_grads(run_composite, inputs, do, window_size, cu)
    low = composite_grads(composite_reference, inputs, do, window_size, cu)
    ref = composite_grads(composite_reference, [t.double() for t in inputs], do, window_size, cu)
    names = ("o", "lse", "dq", "dk", "dv", "dx", "d_gate_weight", "d_gate_bias")
    for name, a, b, c in zip(names, fast, low, ref):
        assert_within_rule(name, a, b, c)


def test_projection_gate_kernel_composes_with_attention(override_tuning, device):
    """The Triton gate kernel's g (log_gates_from_projection) fed to the PyTorch attention,
    packed sequences, against the float64 reference pieces: the piece users call on its own."""
    override_tuning(gate_launch.TUNING, rules={"elementwise": lambda arch: dict(ELEMENTS=64, num_warps=4)})

    def composite(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
        with use_backend("triton"):
            g = log_gates_from_projection(x @ gate_weight.t(), gate_bias)
        return chunked_gated_window_attention(q, k, v, g, window_size, None, cu_seqlens)

    inputs, do = projection_attention_inputs(1, 33, 4, 1, 8, 12, device)
    cu = torch.tensor([0, 10, 33], dtype=torch.int32, device=device)
    fast = composite_grads(composite, inputs, do, 6, cu)
    low = composite_grads(composite_reference, inputs, do, 6, cu)
    ref = composite_grads(composite_reference, [t.double() for t in inputs], do, 6, cu)
    names = ("o", "lse", "dq", "dk", "dv", "dx", "d_gate_weight", "d_gate_bias")
    for name, a, b, c in zip(names, fast, low, ref):
        assert_within_rule(name, a, b, c)


@pytest.mark.parametrize(
    "batch, window_size, cu_seqlens, with_bias",
    [(2, 8, None, True), (1, 12, [0, 13, 13, 29, 40], True), (2, None, None, True), (2, 4, None, False)],
    ids=["w8", "w12-varlen", "full", "w4-no-bias"],
)
@use_backend("triton")
def test_gated_fwa_attention_all_triton(override_tuning, batch, window_size, cu_seqlens, with_bias, device):
    """The fused op (gate sums from gate_pre, attention kernels, gate backward reading dg in
    place), GQA, against the float64 composition of the reference pieces."""
    override_tuning(gate_launch.TUNING, rules={"elementwise": lambda arch: dict(ELEMENTS=64, num_warps=4)})
    q = torch.randn(batch, 40, 4, 16, device=device)
    k = torch.randn(batch, 40, 2, 16, device=device)
    v = torch.randn(batch, 40, 2, 16, device=device)
    x = torch.randn(batch, 40, 32, device=device)
    gate_weight = torch.randn(8, 32, device=device) / 32**0.5
    gate_bias = torch.randn(4, device=device) + 2 if with_bias else None
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    inputs = (q, k, v, x, gate_weight, gate_bias)
    do = torch.randn(q.shape, dtype=torch.float64, device=device)
    names = ("o", "lse", "dq", "dk", "dv", "dx", "d_gate_weight", "d_gate_bias")
    if gate_bias is None:
        inputs, names = inputs[:-1], names[:-1]

        def with_none(fn):
            return lambda *args: fn(*args[:5], None, *args[5:])
        fast_fn, ref_fn = with_none(run_composite), with_none(composite_reference)
    else:
        fast_fn, ref_fn = run_composite, composite_reference
    fast = composite_grads(fast_fn, inputs, do, window_size, cu)
    low = composite_grads(ref_fn, inputs, do, window_size, cu)
    ref = composite_grads(ref_fn, [t.double() for t in inputs], do, window_size, cu)
    for name, a, b, c in zip(names, fast, low, ref):
        # float32 slack as in the attention tests. The gradients that flow through the gate
        # (dx, d_gate_weight, d_gate_bias) get ten times that: the kernels' dg is a float64
        # reverse cumulative sum of float32 row and column sums of dS, ~1e-6 relative to
        # those sums, and the projection's backward adds it up over tokens.
        through_gate = name in ("dx", "d_gate_weight", "d_gate_bias")
        atol = float32_slack(c, torch.float32) * (10 if through_gate else 1)
        assert_within_rule(name, a, b, c, atol=atol)


@use_backend("triton")
def test_gate_attention_opcheck(device):
    """The fused op's schema, fake tensors and autograd registration."""
    q = torch.randn(1, 9, 2, 16, device=device, requires_grad=True)
    k = torch.randn(1, 9, 1, 16, device=device, requires_grad=True)
    v = torch.randn(1, 9, 1, 16, device=device, requires_grad=True)
    gate_pre = torch.randn(1, 9, 4, device=device, requires_grad=True)
    bias = torch.randn(2, device=device, requires_grad=True)
    torch.library.opcheck(
        fused_gate._gate_attention.op, (q, k, v, gate_pre, bias, 4, 0.25, None),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@use_backend("triton")
def test_gate_attention_eager_path_matches_custom_op(device):
    """Eager calls take an autograd.Function instead of the custom op (less host work); both
    run the same kernels, so outputs and gradients agree bit for bit."""
    shapes = [(1, 40, 2, 16), (1, 40, 1, 16), (1, 40, 1, 16), (1, 40, 4), (2,)]
    leaves = [torch.randn(*shape, device=device) for shape in shapes]
    do = torch.randn(1, 40, 2, 16, device=device)
    results = []
    for via_op in (False, True):
        inputs = [x.clone().requires_grad_() for x in leaves]
        if via_op:
            o = fused_gate._gate_attention.op(*inputs, 8, 0.25, None)[0]
        else:
            o = fused_gate._fused_gate_attention(*inputs, 8, 0.25, None)[0]
        o.backward(do)
        results.append([o.detach()] + [x.grad for x in inputs])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gated_fwa_attention_validation():
    q = torch.randn(1, 6, 4, 8)
    kv = torch.randn(1, 6, 2, 8)
    x = torch.randn(1, 6, 10)
    weight, bias = torch.randn(8, 10), torch.randn(4)
    cases = [
        (dict(gate_weight=torch.randn(4, 10)), ValueError, r"gate_weight must have shape \[2 \* query_heads, model_dim\] = \[8, 10\]"),
        (dict(gate_weight=torch.randn(8, 9)), ValueError, "gate_weight must have shape"),
        (dict(gate_weight=weight.double()), TypeError, "gate_weight must have x's dtype"),
        (dict(gate_bias=torch.randn(8)), ValueError, r"gate_bias must have shape \[4\]"),
        (dict(gate_bias=torch.randn(4).long()), TypeError, "gate_bias must be a floating-point tensor"),
        (dict(x=torch.randn(1, 5, 10)), ValueError, "x and q must agree in batch and seqlen"),
        (dict(x=torch.randn(6, 10)), ValueError, "x must have 3 dimensions"),
        (dict(k=torch.randn(1, 6, 3, 8), v=torch.randn(1, 6, 3, 8)), ValueError, "positive multiple"),
        (dict(window_size=0), ValueError, "window_size must be >= 1"),
    ]
    for changes, error, message in cases:
        args = dict(q=q, k=kv, v=kv, x=x, gate_weight=weight, gate_bias=bias, window_size=None)
        args.update(changes)
        with pytest.raises(error, match=message):
            gated_fwa_attention(**args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gate_attention_from_projection_reads_a_column_slice(backend, device):
    """gate_attention_from_projection with gate_pre taken as the last 2 HQ columns of a wider
    projection (as GatedFWAttention's one GEMM for q and the gate gives it): output and
    gradients, through the slice, against the float64 composition of the reference pieces."""
    other_weight = torch.randn(16, 32, device=device)

    def from_wide_projection(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
        wide = x @ torch.cat((other_weight.to(x.dtype), gate_weight)).t()
        return gate_attention_from_projection(q, k, v, wide[..., 16:], gate_bias, window_size=window_size,
                                              cu_seqlens=cu_seqlens, return_lse=True)

    inputs, do = projection_attention_inputs(2, 23, 4, 2, 16, 32, device)
    with use_backend(backend):
        fast = composite_grads(from_wide_projection, inputs, do, 7, None)
    low = composite_grads(composite_reference, inputs, do, 7, None)
    ref = composite_grads(composite_reference, [t.double() for t in inputs], do, 7, None)
    names = ("o", "lse", "dq", "dk", "dv", "dx", "d_gate_weight", "d_gate_bias")
    for name, a, b, c in zip(names, fast, low, ref):
        through_gate = backend == "triton" and name in ("dx", "d_gate_weight", "d_gate_bias")
        atol = float32_slack(c, torch.float32) * (10 if through_gate else 1)
        assert_within_rule(name, a, b, c, atol=atol)


def test_gate_attention_from_projection_validation():
    q, kv = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8)
    cases = [
        (dict(gate_pre=torch.randn(1, 6, 4)), ValueError, r"gate_pre must have shape .* = \[1, 6, 8\]"),
        (dict(gate_pre=torch.randn(6, 8)), ValueError, "gate_pre must have 3 dimensions"),
        (dict(gate_pre=torch.randn(1, 6, 8).long()), TypeError, "gate_pre must be a floating-point tensor"),
        (dict(gate_bias=torch.randn(5)), ValueError, r"gate_bias must have shape \[4\]"),
    ]
    for changes, error, message in cases:
        args = dict(q=q, k=kv, v=kv, gate_pre=torch.randn(1, 6, 8), gate_bias=torch.randn(4))
        args.update(changes)
        with pytest.raises(error, match=message):
            gate_attention_from_projection(**args)
