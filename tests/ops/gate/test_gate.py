"""Gate preprocessing: the Triton kernels and the PyTorch path against the float64 autograd
reference of g = logsigmoid(beta * a) / beta, beta = 1 + ELU(beta_pre), with the rule of
docs/correctness.md (error <= 2x the same formula's own error in the same precision + 1e-5),
for values and gradients; plus, where the formula itself overflows in float32 (beta ~ 1e-22),
finiteness and an elementwise relative comparison with the float64 reference.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py). The
kernels are launched with small programs (the program size lowered through launch.TUNING: conftest.py) so that
every test spans several programs and a ragged last one. The gate fused with the attention
(gated_fwa_attention) is tested in tests/ops/window_attention/test_fused_gate.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gatedfwa import compute_log_gates, log_gates_from_projection
from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.gate import gate_spec
from gatedfwa.ops.gate import launch
from gatedfwa.ops.gate import op as gate_op
from gatedfwa.ops.gate.naive import naive_log_gates, naive_log_gates_from_projection
from gatedfwa.ops.gate.torch_path import torch_log_gates
from gatedfwa.testing import assert_elementwise_close, assert_gate_results, assert_within_relative_rule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gates_and_grads(fn, a, beta_pre, dg):
    """fn(a, beta_pre) -> g; returns (g, da, dbeta_pre), detached."""
    a = a.detach().clone().requires_grad_()
    beta_pre = beta_pre.detach().clone().requires_grad_()
    g = fn(a, beta_pre)
    da, dbeta_pre = torch.autograd.grad(g, (a, beta_pre), dg.to(g.dtype))
    return g.detach(), da, dbeta_pre


def check_gates(fn, a, beta_pre, extremes_rtol=None):
    """g, da, dbeta_pre of fn against the formula in float64 (and in the inputs' precision for
    the rule). Random inputs: the plain rule. Extremes (extremes_rtol: the output_rtol fixture):
    finite everywhere, the rule on relative errors, and an elementwise relative bound (the
    float32 formula's own gradients overflow there, so the rule alone would bound nothing)."""
    dg = torch.randn(a.shape, dtype=torch.float64, device=a.device)
    fast = gates_and_grads(fn, a, beta_pre, dg)
    low = gates_and_grads(naive_log_gates, a, beta_pre, dg)
    ref = gates_and_grads(naive_log_gates, a.double(), beta_pre.double(), dg)
    assert fast[0].dtype == torch.float32
    assert fast[1].dtype == a.dtype and fast[2].dtype == beta_pre.dtype
    assert_gate_results("sharpened", ("g", "da", "dbeta_pre"), fast, low, ref, extremes_rtol)
    return fast


# ----------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------


def test_reference_gradcheck():
    """Both PyTorch formulations, in float64, against finite differences (beta from ~0.02 to 10)."""
    a = (torch.randn(3, 5, 4, dtype=torch.float64) * 3).requires_grad_()
    beta_pre = (torch.randn(3, 5, 4, dtype=torch.float64) * 3).clamp(-4, 9).requires_grad_()
    assert torch.autograd.gradcheck(naive_log_gates, (a, beta_pre))
    assert torch.autograd.gradcheck(lambda *x: torch_log_gates(gate_spec("sharpened"), *x), (a, beta_pre))


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
def test_log_gates_extremes(backend, dtype, device, output_rtol):
    """a in +-{1e4, 1e3, 30, 1, 1e-3, 0} against beta_pre from -50 (beta ~ 2e-22) to 50 (beta =
    51): g reaches -3.6e21 and dg/dbeta_pre 3.6e21, where the float32 formula's gradient
    overflows (it divides by beta^2 ~ 4e-44)."""
    magnitudes = torch.tensor([1e4, 1e3, 30.0, 1.0, 1e-3])
    a_values = torch.cat([magnitudes, -magnitudes, torch.zeros(1)])
    beta_values = torch.cat([torch.linspace(-50, 50, 41), torch.tensor([-1e-3, 0.0, 1e-3])])
    a, beta_pre = torch.meshgrid(a_values, beta_values, indexing="ij")
    a = a.reshape(1, -1, 4).to(device, DTYPES[dtype])
    beta_pre = beta_pre.reshape(1, -1, 4).to(device, DTYPES[dtype])
    g, da, dbeta_pre = check_gates(compute_log_gates, a, beta_pre, extremes_rtol=output_rtol)
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


def projection_grads(fn, gate_pre, gate_bias, dg):
    leaves = [gate_pre.detach().clone().requires_grad_()]
    if gate_bias is not None:
        leaves.append(gate_bias.detach().clone().requires_grad_())
    g = fn(leaves[0], leaves[1] if gate_bias is not None else None)
    grads = torch.autograd.grad(g, leaves, dg.to(g.dtype))
    return (g.detach(), *grads)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_projection(backend, dtype, with_bias, device, output_rtol):
    heads = 6
    gate_pre = (torch.randn(2, 29, 2 * heads, device=device) * 3).to(DTYPES[dtype])
    gate_pre[0, :3, heads:] = -50.0  # beta ~ 2e-22 on a few tokens
    gate_pre[1, :3, :heads] = 1e4
    gate_bias = torch.randn(heads, device=device).to(DTYPES[dtype]) if with_bias else None
    dg = torch.randn(2, 29, heads, dtype=torch.float64, device=device)
    fast = projection_grads(log_gates_from_projection, gate_pre, gate_bias, dg)
    low = projection_grads(naive_log_gates_from_projection, gate_pre, gate_bias, dg)
    as64 = None if gate_bias is None else gate_bias.double()
    ref = projection_grads(naive_log_gates_from_projection, gate_pre.double(), as64, dg)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == gate_pre.dtype
    names = ("g", "d_gate_pre", "d_bias")
    for name, x, y, z in zip(names, fast, low, ref):
        assert torch.isfinite(x).all(), f"{name} has non-finite entries"
        assert_within_relative_rule(name, x, y, z)
    for name, x, z in zip(names[:2], fast[:2], ref[:2]):
        assert_elementwise_close(name, x, z, output_rtol(x.dtype))


@pytest.mark.parametrize("elements", [64, 4096])
def test_projection_backward_reads_dg_by_head(small_programs, elements, device, output_rtol):
    """The fused op's backward reads dg in the attention's [B, H, T] layout (dg_seqlen = T):
    the same d(gate_pre) as from dg [B*T, H], and both within the rule of the float64
    gradients. Small programs (ragged in every batch row) and one program per row."""
    with launch.TUNING.overridden(rules={"elementwise": lambda arch: dict(ELEMENTS=elements, num_warps=4)}):
        batch, seqlen, heads = 3, 37, 5
        gate_pre = torch.randn(batch, seqlen, 2 * heads, device=device) * 3
        gate_bias = torch.randn(heads, device=device)
        dg = torch.randn(batch, heads, seqlen, device=device)
        by_head = gate_op.projection_backward(dg, gate_pre, gate_bias, dg_seqlen=seqlen)
        by_row = gate_op.projection_backward(dg.transpose(1, 2).reshape(-1, heads), gate_pre, gate_bias)
        assert torch.equal(by_head[0], by_row[0])
        low = projection_grads(naive_log_gates_from_projection, gate_pre, gate_bias, dg.transpose(1, 2))
        ref = projection_grads(naive_log_gates_from_projection, gate_pre.double(), gate_bias.double(), dg.transpose(1, 2))
        for name, index in (("d_gate_pre", 0), ("d_bias", 1)):
            for fast in (by_head, by_row):
                assert torch.isfinite(fast[index]).all()
                assert_within_relative_rule(name, fast[index], low[index + 1], ref[index + 1])
        assert_elementwise_close("d_gate_pre", by_head[0], ref[1], output_rtol(torch.float32))


def test_triton_and_torch_backends_agree(small_programs, device):
    """The two paths side by side on one projection (values and both gradients)."""
    gate_pre = torch.randn(3, 21, 10, device=device) * 5
    gate_bias = torch.randn(5, device=device)
    dg = torch.randn(3, 21, 5, dtype=torch.float64, device=device)
    results = {}
    for backend in ("triton", "torch"):
        with use_backend(backend):
            results[backend] = projection_grads(log_gates_from_projection, gate_pre, gate_bias, dg)
    for x, y in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_custom_ops_opcheck(small_programs, device):
    """Fake (meta) kernels, schemas and autograd registrations of the Triton custom ops."""
    a = torch.randn(2, 5, 3, device=device, requires_grad=True)
    beta_pre = torch.randn(2, 5, 3, device=device, requires_grad=True)
    torch.library.opcheck(gate_op._log_gates.op, (a, beta_pre), test_utils=("test_schema", "test_faketensor",
                                                                          "test_autograd_registration"))
    gate_pre = torch.randn(2, 5, 6, device=device, requires_grad=True)
    for bias in (torch.randn(3, device=device, requires_grad=True), None):
        torch.library.opcheck(gate_op._projection.op, (gate_pre, bias), test_utils=("test_schema", "test_faketensor",
                                                                                  "test_autograd_registration"))


# ----------------------------------------------------------------------------------------
# The custom ops and their eager paths
# ----------------------------------------------------------------------------------------


@use_backend("triton")
def test_gate_eager_paths_match_custom_ops(device):
    """compute_log_gates and log_gates_from_projection take autograd.Functions in eager mode
    (less host work than the custom ops torch.compile sees); same kernels, same bits."""
    cases = [
        (compute_log_gates, gate_op._log_gates.op, [(2, 7, 4), (2, 7, 4)]),
        (log_gates_from_projection, gate_op._projection.op, [(2, 7, 8), (4,)]),
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


@use_backend("triton")
def test_compile_fullgraph(device):
    """The gate's custom ops keep a torch.compile(fullgraph=True) graph whole, backward included."""
    gate_pre = torch.randn(2, 5, 8, device=device, requires_grad=True)
    gate_bias = torch.randn(4, device=device, requires_grad=True)
    compiled = torch.compile(log_gates_from_projection, backend="aot_eager", fullgraph=True)
    compiled(gate_pre, gate_bias).sum().backward()
    dg = torch.ones(2, 5, 4, dtype=torch.float64, device=device)
    expected = projection_grads(naive_log_gates_from_projection, gate_pre, gate_bias, dg)
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


@use_backend("triton")
def test_projection_without_grad_skips_the_custom_op(monkeypatch, device):
    """Under no_grad (decoding) the launcher runs directly, with the same result as the op:
    neither the custom op nor the eager autograd.Function is called."""
    gate_pre = torch.randn(2, 7, 8, device=device)
    bias = torch.randn(4, device=device)
    with_op = gate_op._projection.op(gate_pre, bias)
    calls = []
    monkeypatch.setattr(gate_op._projection, "op", lambda *args: calls.append(args))
    monkeypatch.setattr(gate_op._projection, "function", SimpleNamespace(apply=lambda *args: calls.append(args)))
    with torch.no_grad():
        direct = log_gates_from_projection(gate_pre, bias)
    assert calls == []
    torch.testing.assert_close(direct, with_op, rtol=0, atol=0)
