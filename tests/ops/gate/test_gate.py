"""Gate preprocessing: the Triton kernels and the PyTorch path against the float64 autograd
reference of g = logsigmoid(beta * a) / beta, beta = 1 + ELU(beta_pre), with the rule of
docs/correctness.md (error <= 2x the same formula's own error in the same precision + 1e-5),
for values and gradients; plus, where the formula itself overflows in float32 (beta ~ 1e-22),
finiteness and an elementwise relative comparison with the float64 reference.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py). The kernels
are launched with small programs (ELEMENTS_PER_PROGRAM lowered) so that every test spans
several programs and a ragged last one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gatedfwa import compute_log_gates, gated_fwa_attention, log_gates_from_projection
from gatedfwa.ops.gate import kernels as gate_kernels
from gatedfwa.ops.gate import op as gate_op
from gatedfwa.ops.gate.reference import naive_log_gates, reference_log_gates
from gatedfwa.ops.window_attention.reference import chunked_gated_window_attention, naive_gated_window_attention
from gatedfwa.testing import assert_within_rule, float32_slack

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Force a backend; for Triton, small programs and NaN-filled output buffers."""
    monkeypatch.setenv("GATEDFWA_BACKEND", request.param)
    if request.param == "triton":
        monkeypatch.setattr(gate_kernels, "ELEMENTS_PER_PROGRAM", 64)
        monkeypatch.setattr(
            gate_kernels, "allocate", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
        )
    return request.param


def gates_and_grads(fn, a, beta_pre, dg):
    """fn(a, beta_pre) -> g; returns (g, da, dbeta_pre), detached."""
    a = a.detach().clone().requires_grad_()
    beta_pre = beta_pre.detach().clone().requires_grad_()
    g = fn(a, beta_pre)
    da, dbeta_pre = torch.autograd.grad(g, (a, beta_pre), dg.to(g.dtype))
    return g.detach(), da, dbeta_pre


def assert_within_relative_rule(name, fast, low, ref64):
    """The rule of docs/correctness.md on errors relative to max(|ref|, 1), for outputs that span many decades
    (g from -3.6e21 to -1e-30 in one tensor): there a plain maximum would compare the rounding
    of the single largest element only."""
    scale = ref64.abs().clamp(min=1)
    assert_within_rule(name, fast.double() / scale, low.double() / scale, ref64 / scale)


def assert_elementwise_close(name, fast, ref64, rtol):
    """|fast - ref| <= rtol |ref| + 1e-9 everywhere; the 1e-9 covers the float64 formula's own
    cancellation (~ |a| 1e-16 in its beta gradient)."""
    excess = ((fast.double() - ref64).abs() - (rtol * ref64.abs() + 1e-9)).max().item()
    assert excess <= 0, f"{name}: elementwise error exceeds {rtol:.0e} relative by {excess:.3e}"


def output_rtol(dtype):
    """Elementwise tolerance: ~170 float32 ulps for float32 results (the rounding of z = beta a
    is amplified ~|z| times in exp(-|z|)), two roundings for bf16/fp16 results."""
    return 2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def check_gates(fn, a, beta_pre, extremes=False):
    """g, da, dbeta_pre of fn against the formula in float64 (and in the inputs' precision for
    the rule). Random inputs: the plain rule. Extremes: finite everywhere, the rule on relative
    errors, and an elementwise relative bound (the float32 formula's own gradients overflow
    there, so the rule alone would bound nothing)."""
    dg = torch.randn(a.shape, dtype=torch.float64, device=a.device)
    fast = gates_and_grads(fn, a, beta_pre, dg)
    low = gates_and_grads(naive_log_gates, a, beta_pre, dg)
    ref = gates_and_grads(naive_log_gates, a.double(), beta_pre.double(), dg)
    assert fast[0].dtype == torch.float32
    assert fast[1].dtype == a.dtype and fast[2].dtype == beta_pre.dtype
    for name, x, y, z in zip(("g", "da", "dbeta_pre"), fast, low, ref):
        assert torch.isfinite(x).all(), f"{name} has non-finite entries"
        if extremes:
            assert_within_relative_rule(name, x, y, z)
            assert_elementwise_close(name, x, z, output_rtol(x.dtype))
        else:
            assert_within_rule(name, x, y, z)
    assert (fast[0] <= 0).all()
    return fast


# ----------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------


def test_reference_gradcheck():
    """Both PyTorch formulations, in float64, against finite differences (beta from ~0.02 to 10)."""
    a = (torch.randn(3, 5, 4, dtype=torch.float64) * 3).requires_grad_()
    beta_pre = (torch.randn(3, 5, 4, dtype=torch.float64) * 3).clamp(-4, 9).requires_grad_()
    assert torch.autograd.gradcheck(naive_log_gates, (a, beta_pre))
    assert torch.autograd.gradcheck(reference_log_gates, (a, beta_pre))


def test_beta_stays_positive_where_one_plus_elu_underflows():
    """1 + ELU(-50) is exactly 0 in float64; the stable beta keeps exp(-50)."""
    beta_pre = torch.tensor([-50.0, -200.0], dtype=torch.float64)
    assert (1 + F.elu(beta_pre) == 0).all()
    g = naive_log_gates(torch.zeros_like(beta_pre), beta_pre)
    expected = -torch.log(torch.tensor(2.0, dtype=torch.float64)) / torch.exp(beta_pre)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------
# compute_log_gates: random inputs and extremes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_log_gates_random(backend, dtype, device):
    """Gates in their usual range: beta from 0.05 up, |g| and the gradients up to ~20."""
    a = (torch.randn(2, 37, 5, device=device) * 3).to(DTYPES[dtype])
    beta_pre = (torch.randn(2, 37, 5, device=device) * 1.5).clamp(min=-3).to(DTYPES[dtype])
    check_gates(compute_log_gates, a, beta_pre)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_log_gates_extremes(backend, dtype, device):
    """a in +-{1e4, 1e3, 30, 1, 1e-3, 0} against beta_pre from -50 (beta ~ 2e-22) to 50 (beta =
    51): g reaches -3.6e21 and dg/dbeta_pre 3.6e21, where the float32 formula's gradient
    overflows (it divides by beta^2 ~ 4e-44)."""
    magnitudes = torch.tensor([1e4, 1e3, 30.0, 1.0, 1e-3])
    a_values = torch.cat([magnitudes, -magnitudes, torch.zeros(1)])
    beta_values = torch.cat([torch.linspace(-50, 50, 41), torch.tensor([-1e-3, 0.0, 1e-3])])
    a, beta_pre = torch.meshgrid(a_values, beta_values, indexing="ij")
    a = a.reshape(1, -1, 4).to(device, DTYPES[dtype])
    beta_pre = beta_pre.reshape(1, -1, 4).to(device, DTYPES[dtype])
    g, da, dbeta_pre = check_gates(compute_log_gates, a, beta_pre, extremes=True)
    assert g.min() < -1e21 and dbeta_pre.max() > 1e21  # the extreme end was reached


def test_log_gates_float64_inputs_give_float32(backend, device):
    a = torch.randn(1, 9, 3, dtype=torch.float64, device=device)
    beta_pre = torch.randn(1, 9, 3, dtype=torch.float64, device=device)
    g = compute_log_gates(a, beta_pre)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, naive_log_gates(a, beta_pre).float(), rtol=2e-6, atol=1e-6)


def test_log_gates_non_contiguous_and_empty(backend, device):
    base = torch.randn(2, 3, 11, 6, device=device)
    a, beta_pre = base[:, 0, :, :5].transpose(0, 1), base[:, 1, :, 1:].transpose(0, 1)  # [11, 2, 5] views
    torch.testing.assert_close(compute_log_gates(a, beta_pre), naive_log_gates(a, beta_pre), rtol=2e-6, atol=1e-6)
    empty = torch.randn(2, 0, 4, device=device, requires_grad=True)
    g = compute_log_gates(empty, empty)
    assert g.shape == (2, 0, 4)
    g.sum().backward()
    assert empty.grad.shape == empty.shape


def test_log_gates_cu_seqlens_changes_nothing(backend, device):
    a = torch.randn(1, 30, 4, device=device)
    beta_pre = torch.randn(1, 30, 4, device=device)
    cu_seqlens = torch.tensor([0, 7, 7, 30], dtype=torch.int32, device=device)
    torch.testing.assert_close(compute_log_gates(a, beta_pre, cu_seqlens), compute_log_gates(a, beta_pre))
    with pytest.raises(ValueError, match="cu_seqlens must end at the packed length"):
        compute_log_gates(a, beta_pre, torch.tensor([0, 7, 29], dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------------------
# log_gates_from_projection: the fused layout [B, T, 2H] + bias
# ----------------------------------------------------------------------------------------


def projection_reference(gate_pre, gate_bias):
    """The formula on the split projection, in gate_pre's dtype (float64 for the reference)."""
    heads = gate_pre.shape[-1] // 2
    a = gate_pre[..., :heads]
    if gate_bias is not None:
        a = a + gate_bias.to(a.dtype)
    return naive_log_gates(a, gate_pre[..., heads:])


def projection_grads(fn, gate_pre, gate_bias, dg):
    leaves = [gate_pre.detach().clone().requires_grad_()]
    if gate_bias is not None:
        leaves.append(gate_bias.detach().clone().requires_grad_())
    g = fn(leaves[0], leaves[1] if gate_bias is not None else None)
    grads = torch.autograd.grad(g, leaves, dg.to(g.dtype))
    return (g.detach(), *grads)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_projection(backend, dtype, with_bias, device):
    heads = 6
    gate_pre = (torch.randn(2, 29, 2 * heads, device=device) * 3).to(DTYPES[dtype])
    gate_pre[0, :3, heads:] = -50.0  # beta ~ 2e-22 on a few tokens
    gate_pre[1, :3, :heads] = 1e4
    gate_bias = torch.randn(heads, device=device).to(DTYPES[dtype]) if with_bias else None
    dg = torch.randn(2, 29, heads, dtype=torch.float64, device=device)
    fast = projection_grads(log_gates_from_projection, gate_pre, gate_bias, dg)
    low = projection_grads(projection_reference, gate_pre, gate_bias, dg)
    as64 = None if gate_bias is None else gate_bias.double()
    ref = projection_grads(projection_reference, gate_pre.double(), as64, dg)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == gate_pre.dtype
    names = ("g", "d_gate_pre", "d_bias")
    for name, x, y, z in zip(names, fast, low, ref):
        assert torch.isfinite(x).all(), f"{name} has non-finite entries"
        assert_within_relative_rule(name, x, y, z)
    for name, x, z in zip(names[:2], fast[:2], ref[:2]):
        assert_elementwise_close(name, x, z, output_rtol(x.dtype))


@pytest.mark.parametrize("elements", [64, 4096])
def test_projection_backward_reads_dg_by_head(monkeypatch, elements, device):
    """The fused op's backward reads dg in the attention's [B, H, T] layout (dg_seqlen = T):
    the same d(gate_pre) as from dg [B*T, H], and both within the rule of the float64
    gradients. Small programs (ragged in every batch row) and one program per row."""
    monkeypatch.setattr(gate_kernels, "ELEMENTS_PER_PROGRAM", elements)
    monkeypatch.setattr(
        gate_kernels, "allocate", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    batch, seqlen, heads = 3, 37, 5
    gate_pre = torch.randn(batch, seqlen, 2 * heads, device=device) * 3
    gate_bias = torch.randn(heads, device=device)
    dg = torch.randn(batch, heads, seqlen, device=device)
    by_head = gate_op.projection_backward(dg, gate_pre, gate_bias, dg_seqlen=seqlen)
    by_row = gate_op.projection_backward(dg.transpose(1, 2).reshape(-1, heads), gate_pre, gate_bias)
    assert torch.equal(by_head[0], by_row[0])
    low = projection_grads(projection_reference, gate_pre, gate_bias, dg.transpose(1, 2))
    ref = projection_grads(projection_reference, gate_pre.double(), gate_bias.double(), dg.transpose(1, 2))
    for name, index in (("d_gate_pre", 0), ("d_bias", 1)):
        for fast in (by_head, by_row):
            assert torch.isfinite(fast[index]).all()
            assert_within_relative_rule(name, fast[index], low[index + 1], ref[index + 1])
    assert_elementwise_close("d_gate_pre", by_head[0], ref[1], output_rtol(torch.float32))


def test_triton_and_torch_backends_agree(monkeypatch, device):
    """The two paths side by side on one projection (values and both gradients)."""
    monkeypatch.setattr(gate_kernels, "ELEMENTS_PER_PROGRAM", 64)
    gate_pre = torch.randn(3, 21, 10, device=device) * 5
    gate_bias = torch.randn(5, device=device)
    dg = torch.randn(3, 21, 5, dtype=torch.float64, device=device)
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("GATEDFWA_BACKEND", backend)
        results[backend] = projection_grads(log_gates_from_projection, gate_pre, gate_bias, dg)
    for x, y in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_custom_ops_opcheck(monkeypatch, device):
    """Fake (meta) kernels, schemas and autograd registrations of the Triton custom ops."""
    monkeypatch.setattr(gate_kernels, "ELEMENTS_PER_PROGRAM", 64)
    a = torch.randn(2, 5, 3, device=device, requires_grad=True)
    beta_pre = torch.randn(2, 5, 3, device=device, requires_grad=True)
    torch.library.opcheck(gate_op._log_gates_op, (a, beta_pre), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    gate_pre = torch.randn(2, 5, 6, device=device, requires_grad=True)
    for bias in (torch.randn(3, device=device, requires_grad=True), None):
        torch.library.opcheck(gate_op._projection_op, (gate_pre, bias), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------
# gated_fwa_attention: x and the gate weights to the attention output
# ----------------------------------------------------------------------------------------


def composite_reference(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
    """The composition of the reference pieces in the inputs' dtype: projection, formula,
    naive quadratic attention."""
    gate_pre = x @ gate_weight.t()
    g = projection_reference(gate_pre, gate_bias)
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
def test_gated_fwa_attention(monkeypatch, batch, window_size, cu_seqlens, device):
    """Torch attention backend (the Triton attention kernels have their own tests): output,
    lse and the gradients of q, k, v, x, gate_weight and gate_bias against the float64
    composition of the reference pieces."""
    monkeypatch.setenv("GATEDFWA_BACKEND", "torch")
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


def test_projection_gate_kernel_composes_with_attention(monkeypatch, device):
    """The Triton gate kernel's g (log_gates_from_projection) fed to the PyTorch attention,
    packed sequences, against the float64 reference pieces: the piece users call on its own."""
    monkeypatch.setattr(gate_kernels, "ELEMENTS_PER_PROGRAM", 64)

    def composite(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
        monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
        g = log_gates_from_projection(x @ gate_weight.t(), gate_bias)
        monkeypatch.setenv("GATEDFWA_BACKEND", "torch")
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
def test_gated_fwa_attention_all_triton(monkeypatch, batch, window_size, cu_seqlens, with_bias, device):
    """The fused op (gate sums from gate_pre, attention kernels, gate backward reading dg in
    place), GQA, against the float64 composition of the reference pieces."""
    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    monkeypatch.setattr(gate_kernels, "ELEMENTS_PER_PROGRAM", 64)
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


def test_gate_attention_opcheck(monkeypatch, device):
    """The fused op's schema, fake tensors and autograd registration."""
    from gatedfwa.ops.window_attention import fused_gate

    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    q = torch.randn(1, 9, 2, 16, device=device, requires_grad=True)
    k = torch.randn(1, 9, 1, 16, device=device, requires_grad=True)
    v = torch.randn(1, 9, 1, 16, device=device, requires_grad=True)
    gate_pre = torch.randn(1, 9, 4, device=device, requires_grad=True)
    bias = torch.randn(2, device=device, requires_grad=True)
    torch.library.opcheck(
        fused_gate._gate_attention_forward, (q, k, v, gate_pre, bias, 4, 0.25, None),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_gate_eager_paths_match_custom_ops(monkeypatch, device):
    """compute_log_gates and log_gates_from_projection take autograd.Functions in eager mode
    (less host work than the custom ops torch.compile sees); same kernels, same bits."""
    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    cases = [
        (compute_log_gates, gate_op._log_gates_op, [(2, 7, 4), (2, 7, 4)]),
        (log_gates_from_projection, gate_op._projection_op, [(2, 7, 8), (4,)]),
    ]
    for public, op, shapes in cases:
        leaves = [torch.randn(*shape, device=device) for shape in shapes]
        dg = torch.randn(2, 7, 4, device=device)
        results = []
        for fn in (public, op):
            inputs = [x.clone().requires_grad_() for x in leaves]
            g = fn(*inputs)
            g.backward(dg)
            results.append([g.detach()] + [x.grad for x in inputs])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gate_attention_eager_path_matches_custom_op(monkeypatch, device):
    """Eager calls take an autograd.Function instead of the custom op (less host work); both
    run the same kernels, so outputs and gradients agree bit for bit."""
    from gatedfwa.ops.window_attention import fused_gate

    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    shapes = [(1, 40, 2, 16), (1, 40, 1, 16), (1, 40, 1, 16), (1, 40, 4), (2,)]
    leaves = [torch.randn(*shape, device=device) for shape in shapes]
    do = torch.randn(1, 40, 2, 16, device=device)
    results = []
    for via_op in (False, True):
        inputs = [x.clone().requires_grad_() for x in leaves]
        if via_op:
            o = fused_gate._gate_attention_forward(*inputs, 8, 0.25, None)[0]
        else:
            o = fused_gate._fused_gate_attention(*inputs, 8, 0.25, None)[0]
        o.backward(do)
        results.append([o.detach()] + [x.grad for x in inputs])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_fullgraph(monkeypatch, device):
    """The gate's custom ops keep a torch.compile(fullgraph=True) graph whole, backward included."""
    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    gate_pre = torch.randn(2, 5, 8, device=device, requires_grad=True)
    gate_bias = torch.randn(4, device=device, requires_grad=True)
    compiled = torch.compile(log_gates_from_projection, backend="aot_eager", fullgraph=True)
    compiled(gate_pre, gate_bias).sum().backward()
    dg = torch.ones(2, 5, 4, dtype=torch.float64, device=device)
    expected = projection_grads(projection_reference, gate_pre, gate_bias, dg)
    torch.testing.assert_close(gate_pre.grad, expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate_bias.grad, expected[2], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def test_log_gates_validation():
    a = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="a must have 3 dimensions"):
        compute_log_gates(a[0], a[0])
    with pytest.raises(ValueError, match="a and beta_pre must have the same shape"):
        compute_log_gates(a, a[:, :4])
    with pytest.raises(TypeError, match="beta_pre must be a floating-point tensor"):
        compute_log_gates(a, a.long())
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        compute_log_gates(1.0, a)
    with pytest.raises(ValueError, match="batch size must be 1"):
        compute_log_gates(a, a, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="gate_pre's last dimension must be even"):
        log_gates_from_projection(torch.randn(2, 5, 7), None)
    with pytest.raises(ValueError, match=r"gate_bias must have shape \[3\]"):
        log_gates_from_projection(torch.randn(2, 5, 6), torch.randn(6))
    with pytest.raises(ValueError, match="gate_pre must have 3 dimensions"):
        log_gates_from_projection(torch.randn(5, 6), None)


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
def test_gate_attention_from_projection_reads_a_column_slice(monkeypatch, backend, device):
    """gate_attention_from_projection with gate_pre taken as the last 2 HQ columns of a wider
    projection (as GatedFWAttention's one GEMM for q and the gate gives it): output and
    gradients, through the slice, against the float64 composition of the reference pieces."""
    from gatedfwa.ops.window_attention.fused_gate import gate_attention_from_projection

    monkeypatch.setenv("GATEDFWA_BACKEND", backend)
    other_weight = torch.randn(16, 32, device=device)

    def from_wide_projection(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
        wide = x @ torch.cat((other_weight.to(x.dtype), gate_weight)).t()
        return gate_attention_from_projection(q, k, v, wide[..., 16:], gate_bias, window_size=window_size,
                                              cu_seqlens=cu_seqlens, return_lse=True)

    inputs, do = projection_attention_inputs(2, 23, 4, 2, 16, 32, device)
    fast = composite_grads(from_wide_projection, inputs, do, 7, None)
    low = composite_grads(composite_reference, inputs, do, 7, None)
    ref = composite_grads(composite_reference, [t.double() for t in inputs], do, 7, None)
    names = ("o", "lse", "dq", "dk", "dv", "dx", "d_gate_weight", "d_gate_bias")
    for name, a, b, c in zip(names, fast, low, ref):
        through_gate = backend == "triton" and name in ("dx", "d_gate_weight", "d_gate_bias")
        atol = float32_slack(c, torch.float32) * (10 if through_gate else 1)
        assert_within_rule(name, a, b, c, atol=atol)


def test_gate_attention_from_projection_validation():
    from gatedfwa.ops.window_attention.fused_gate import gate_attention_from_projection

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

def test_import_without_triton():
    """Triton is optional: without it, the package imports and the gate runs its PyTorch path."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, gatedfwa\n"
        "g = gatedfwa.compute_log_gates(torch.randn(1, 4, 2), torch.randn(1, 4, 2))\n"
        "assert g.shape == (1, 4, 2) and (g <= 0).all()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GATEDFWA_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def test_projection_without_grad_skips_the_custom_op(monkeypatch, device):
    """Under no_grad (decoding) the launcher runs directly, with the same result as the op."""
    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    gate_pre = torch.randn(2, 7, 8, device=device)
    bias = torch.randn(4, device=device)
    with_op = gate_op._projection_op(gate_pre, bias)
    calls = []
    monkeypatch.setattr(gate_op, "_projection_op", lambda *args: calls.append(args))
    with torch.no_grad():
        direct = log_gates_from_projection(gate_pre, bias)
    assert calls == []
    torch.testing.assert_close(direct, with_op, rtol=0, atol=0)
