"""Every registered gate (gatedfwa/ops/gate/registry.py) through every path that evaluates
it: the PyTorch path, the Triton gate kernels (the interpreter on CPU), the chunk sums and
the fused gate + attention op, each against the gate's float64 naive formula
(GateSpec.naive) with the rule of docs/correctness.md; extreme inputs stay finite. Plus the
registry and GateSpec checks, and the ops' errors for a gate's number of inputs.

test_gate.py tests the default gate in more depth (its own extreme range, compile,
the custom ops' eager paths); this file holds the checks every gate must pass, so a new gate
is tested by registering it.
"""

from __future__ import annotations

import pytest
import torch

from gatedfwa import compute_log_gates, gated_fwa_attention, log_gates_from_projection
from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.gate import GATES, GateSpec, gate_spec, register_gate
from gatedfwa.ops.gate import op as gate_op
from gatedfwa.ops.gate.naive import naive_log_gates_from_projection
from gatedfwa.ops.gate.torch_path import torch_log_gates
from gatedfwa.ops.window_attention import fused_gate
from gatedfwa.ops.window_attention.chunk_sums import chunk_gate_sums_from_projection
from gatedfwa.ops.window_attention.fused_gate import gate_attention_from_projection
from gatedfwa.ops.window_attention.naive import naive_chunk_gate_sums, naive_gated_window_attention
from gatedfwa.testing import assert_elementwise_close, assert_gate_results, assert_within_relative_rule, assert_within_rule, float32_slack

GATE_NAMES = list(GATES)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_inputs(spec: GateSpec, shape, device, dtype=torch.float32) -> list[torch.Tensor]:
    """The gate's inputs in their usual range: a ~ N(0, 3^2), further inputs ~ N(0, 1.5^2)
    clamped at -3 (beta from 0.05 up for the default gate)."""
    inputs = [torch.randn(shape, device=device) * 3]
    inputs += [(torch.randn(shape, device=device) * 1.5).clamp(min=-3) for _ in spec.input_names[1:]]
    return [x.to(dtype) for x in inputs]


def extreme_inputs(spec: GateSpec, device, dtype=torch.float32) -> list[torch.Tensor]:
    """a in +-{1e4, 1e3, 104, 88, 30, 1, 1e-3} and 0 (exp(-|a|) underflowing, subnormal and
    ordinary), and for a second input every a against values from -50 to 50, as [1, N, 4]."""
    magnitudes = torch.tensor([1e4, 1e3, 104.0, 88.0, 30.0, 1.0, 1e-3])
    a_values = torch.cat([magnitudes, -magnitudes, torch.zeros(1)])
    if spec.inputs_per_head == 1:
        grid = [a_values.repeat(4)]
    else:
        second = torch.cat([torch.linspace(-50, 50, 41), torch.tensor([-1e-3, 0.0, 1e-3])])
        grid = [t.reshape(-1) for t in torch.meshgrid(a_values, second, indexing="ij")]
    return [t.reshape(1, -1, 4).to(device, dtype) for t in grid]


def gates_and_grads(fn, inputs, dg):
    """fn(*inputs) -> g; returns (g, d input...) detached."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    g = fn(*leaves)
    grads = torch.autograd.grad(g, leaves, dg.to(g.dtype))
    return (g.detach(), *grads)


def check_against_formula(spec, inputs, extremes_rtol=None):
    """compute_log_gates(gate=spec.name) against spec.naive in float64 (and in the inputs'
    precision, for the rule): values and the gradient of every input. Extremes (extremes_rtol:
    the output_rtol fixture): the rule on relative errors and an elementwise bound."""
    dg = torch.randn(inputs[0].shape, dtype=torch.float64, device=inputs[0].device)
    fast = gates_and_grads(lambda *x: compute_log_gates(*x, gate=spec.name), inputs, dg)
    low = gates_and_grads(spec.naive, inputs, dg)
    ref = gates_and_grads(spec.naive, [x.double() for x in inputs], dg)
    assert fast[0].dtype == torch.float32
    assert all(d.dtype == x.dtype for d, x in zip(fast[1:], inputs))
    names = ("g", *(f"d{name}" for name in spec.input_names))
    assert_gate_results(spec.name, names, fast, low, ref, extremes_rtol)
    return fast


# ----------------------------------------------------------------------------------------
# The registry and GateSpec
# ----------------------------------------------------------------------------------------


def test_registry_holds_the_shipped_gates():
    assert GATES["sharpened"].input_names == ("a", "beta_pre")
    assert GATES["forgetting"].input_names == ("a",)
    assert gate_spec("forgetting") is GATES["forgetting"]
    with pytest.raises(ValueError, match=r"unknown gate 'forget'; registered gates are 'sharpened': .*'forgetting'"):
        gate_spec("forget")


def test_gate_spec_checks_its_fields():
    base = GATES["forgetting"]
    fields = dict(name="x", description="", naive=base.naive, forward_torch=base.forward_torch, backward_torch=None,
                  device_value=base.device_value, device_derivatives=base.device_derivatives)
    with pytest.raises(ValueError, match="input_names .* 1 to 2 names"):
        GateSpec(input_names=("a", "b", "c"), **fields)
    with pytest.raises(ValueError, match="input_names"):
        GateSpec(input_names=["a"], **fields)
    with pytest.raises(TypeError, match="naive .* must be callable"):
        GateSpec(input_names=("a",), **{**fields, "naive": 3})
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        GateSpec(input_names=("a",), **{**fields, "name": ""})


def test_register_gate(monkeypatch):
    """A gate registered under a new name is found by every op; a taken name needs replace."""
    monkeypatch.setattr("gatedfwa.ops.gate.registry.GATES", dict(GATES))
    from gatedfwa.ops.gate import registry

    base = GATES["forgetting"]
    spec = GateSpec(name="forgetting-copy", description="a copy", input_names=("a",), naive=base.naive,
                    forward_torch=base.forward_torch, backward_torch=None, device_value=base.device_value,
                    device_derivatives=base.device_derivatives)
    assert register_gate(spec) is spec and registry.GATES["forgetting-copy"] is spec
    a = torch.randn(1, 5, 3)
    torch.testing.assert_close(compute_log_gates(a, gate="forgetting-copy"), compute_log_gates(a, gate="forgetting"))
    with pytest.raises(ValueError, match="already registered"):
        register_gate(spec)
    register_gate(spec, replace=True)
    with pytest.raises(TypeError, match="takes a GateSpec"):
        register_gate("forgetting")


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_torch_path_and_formula_gradcheck(gate):
    """The naive formula and the PyTorch path (analytic backward or autograd), float64,
    against finite differences."""
    spec = gate_spec(gate)
    inputs = [x.double().requires_grad_() for x in random_inputs(spec, (3, 5, 4), "cpu")]
    inputs[1:] = [x.detach().clamp(-4, 9).requires_grad_() for x in inputs[1:]]
    assert torch.autograd.gradcheck(spec.naive, inputs)
    assert torch.autograd.gradcheck(lambda *x: torch_log_gates(spec, *x), inputs)


# ----------------------------------------------------------------------------------------
# The gate alone: compute_log_gates and log_gates_from_projection
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATE_NAMES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_log_gates_random(backend, gate, dtype, device):
    spec = gate_spec(gate)
    check_against_formula(spec, random_inputs(spec, (2, 37, 5), device, DTYPES[dtype]))


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_log_gates_extremes_stay_finite(backend, gate, device, output_rtol):
    """Finite values and gradients over the extreme grid, each element within float32's
    accuracy of the float64 formula."""
    spec = gate_spec(gate)
    check_against_formula(spec, extreme_inputs(spec, device), extremes_rtol=output_rtol)


def projection_reference(gate):
    """g from gate_pre [B, T, n H] and the bias by the gate's naive formula, in gate_pre's dtype."""
    return lambda gate_pre, gate_bias: naive_log_gates_from_projection(gate_pre, gate_bias, gate)


@pytest.mark.parametrize("gate", GATE_NAMES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_projection(backend, gate, with_bias, device, output_rtol):
    """log_gates_from_projection: gate_pre [B, T, n H] and the bias, values and gradients,
    with extreme columns on a few tokens."""
    spec = gate_spec(gate)
    heads = 6
    gate_pre = torch.randn(2, 29, spec.inputs_per_head * heads, device=device) * 3
    gate_pre[1, :3, :heads] = 1e4
    gate_pre[1, 3:6, :heads] = -1e4
    if spec.inputs_per_head == 2:
        gate_pre[0, :3, heads:] = -50.0
    bias = torch.randn(heads, device=device) if with_bias else None
    leaves = [gate_pre] + ([bias] if with_bias else [])
    dg = torch.randn(2, 29, heads, dtype=torch.float64, device=device)
    reference = projection_reference(gate)

    def run(fn, tensors):
        return gates_and_grads(lambda p, *b: fn(p, b[0] if b else None), tensors, dg)

    fast = run(lambda p, b: log_gates_from_projection(p, b, gate=gate), leaves)
    low = run(reference, leaves)
    ref = run(reference, [t.double() for t in leaves])
    assert fast[0].shape == (2, 29, heads) and fast[1].shape == gate_pre.shape
    for name, x, y, z in zip(("g", "d_gate_pre", "d_bias"), fast, low, ref):
        assert torch.isfinite(x).all(), f"{name} has non-finite entries"
        assert_within_relative_rule(name, x, y, z)
    assert_elementwise_close("d_gate_pre", fast[1], ref[1], output_rtol(torch.float32))


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_projection_backward_reads_dg_by_head(small_programs, gate, device, output_rtol):
    """The fused op's backward entry (dg in the attention's [B, H, T] layout) equals the one
    from dg [B*T, H], for every gate."""
    spec = gate_spec(gate)
    batch, seqlen, heads = 3, 21, 5
    gate_pre = torch.randn(batch, seqlen, spec.inputs_per_head * heads, device=device) * 3
    bias = torch.randn(heads, device=device)
    dg = torch.randn(batch, heads, seqlen, device=device)
    by_head = gate_op.projection_backward(dg, gate_pre, bias, dg_seqlen=seqlen, gate=gate)
    by_row = gate_op.projection_backward(dg.transpose(1, 2).reshape(-1, heads), gate_pre, bias, gate=gate)
    assert torch.equal(by_head[0], by_row[0])
    ref = gates_and_grads(projection_reference(gate), [gate_pre.double(), bias.double()], dg.transpose(1, 2))
    assert_elementwise_close("d_gate_pre", by_head[0], ref[1], output_rtol(torch.float32))
    torch.testing.assert_close(by_head[1].double(), ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_chunk_sums_from_projection(gate, device):
    """The chunk sums kernel evaluating the gate in registers, packed sequences and extreme
    columns: finite, and the sums of the float64 formula."""
    spec = gate_spec(gate)
    heads = 3
    gate_pre = torch.randn(1, 48, spec.inputs_per_head * heads, device=device) * 3
    gate_pre[0, 40:, :heads] = torch.tensor([1e4, -1e4, 0.5], device=device)
    bias = torch.randn(heads, device=device)
    cu_seqlens = torch.tensor([0, 5, 5, 30, 48], dtype=torch.int32, device=device)
    sums = chunk_gate_sums_from_projection(gate_pre, bias, 16, cu_seqlens, gate=gate)
    g64 = naive_log_gates_from_projection(gate_pre.double(), bias.double(), gate)
    ref = naive_chunk_gate_sums(g64, 16, cu_seqlens)
    assert torch.isfinite(sums).all()
    assert ((sums.double() - ref).abs() / (ref.abs() + 1e-6)).max().item() < 1e-5


# ----------------------------------------------------------------------------------------
# The fused gate + attention op
# ----------------------------------------------------------------------------------------


def composite_reference(gate):
    """Projection, the gate's naive formula, naive quadratic attention, in the inputs' dtype."""
    def run(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
        g = naive_log_gates_from_projection(x @ gate_weight.t(), gate_bias, gate)
        return naive_gated_window_attention(q, k, v, g.to(q.dtype), window_size=window_size, cu_seqlens=cu_seqlens)

    return run


def composite_grads(fn, inputs, do, window_size, cu_seqlens):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    o, lse = fn(*leaves, window_size, cu_seqlens)
    grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
    return (o.detach(), lse.detach(), *grads)


@pytest.mark.parametrize("gate", GATE_NAMES)
@pytest.mark.parametrize(
    "backend_name, window_size, cu_seqlens",
    [("triton", 8, None), ("triton", None, [0, 13, 13, 29, 40]), ("torch", 8, None)],
    ids=["triton-w8", "triton-full-varlen", "torch-w8"],
)
def test_gated_fwa_attention(small_programs, gate, backend_name, window_size, cu_seqlens, device):
    """gated_fwa_attention(gate=...): on Triton the fused op (chunk sums from gate_pre,
    attention kernels, gate backward from dg in place), elsewhere the composition; output,
    lse and the gradients of q, k, v, x, gate_weight [n HQ, C] and gate_bias against the
    float64 composition of the reference pieces."""
    spec = gate_spec(gate)
    batch = 2 if cu_seqlens is None else 1
    q = torch.randn(batch, 40, 4, 16, device=device)
    k = torch.randn(batch, 40, 2, 16, device=device)
    v = torch.randn(batch, 40, 2, 16, device=device)
    x = torch.randn(batch, 40, 32, device=device)
    gate_weight = torch.randn(spec.inputs_per_head * 4, 32, device=device) / 32**0.5
    gate_bias = torch.randn(4, device=device) + 2  # gates from ~0 to a few units of decay
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    inputs = (q, k, v, x, gate_weight, gate_bias)
    do = torch.randn(q.shape, dtype=torch.float64, device=device)

    def fused(q, k, v, x, gate_weight, gate_bias, window_size, cu_seqlens):
        return gated_fwa_attention(q, k, v, x, gate_weight, gate_bias, window_size=window_size,
                                   cu_seqlens=cu_seqlens, return_lse=True, gate=gate)

    reference = composite_reference(gate)
    with use_backend(backend_name):
        fast = composite_grads(fused, inputs, do, window_size, cu)
    low = composite_grads(reference, inputs, do, window_size, cu)
    ref = composite_grads(reference, [t.double() for t in inputs], do, window_size, cu)
    names = ("o", "lse", "dq", "dk", "dv", "dx", "d_gate_weight", "d_gate_bias")
    for name, a, b, c in zip(names, fast, low, ref):
        # As tests/ops/window_attention/test_fused_gate.py: ten times the float32 slack for the
        # gradients that flow through the attention kernels' dg.
        through_gate = backend_name == "triton" and name in ("dx", "d_gate_weight", "d_gate_bias")
        atol = float32_slack(c, torch.float32) * (10 if through_gate else 1)
        assert_within_rule(name, a, b, c, atol=atol)


@use_backend("triton")
def test_custom_ops_opcheck_with_a_one_input_gate(small_programs, device):
    """Schemas, fake tensors and autograd registrations of the custom ops, "forgetting" gate
    (no second input: its gradient slot is an empty tensor)."""
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    a = torch.randn(2, 5, 3, device=device, requires_grad=True)
    torch.library.opcheck(gate_op._log_gates.op, (a, None, "forgetting"), test_utils=utils)
    gate_pre = torch.randn(2, 5, 3, device=device, requires_grad=True)
    for bias in (torch.randn(3, device=device, requires_grad=True), None):
        torch.library.opcheck(gate_op._projection.op, (gate_pre, bias, "forgetting"), test_utils=utils)
    q = torch.randn(1, 9, 2, 16, device=device, requires_grad=True)
    kv = torch.randn(1, 9, 1, 16, device=device, requires_grad=True)
    gate_pre = torch.randn(1, 9, 2, device=device, requires_grad=True)
    bias = torch.randn(2, device=device, requires_grad=True)
    torch.library.opcheck(fused_gate._gate_attention.op,
                          (q, kv, kv.detach().clone().requires_grad_(), gate_pre, bias, 4, 0.25, None, False, "forgetting"),
                          test_utils=utils)


@use_backend("triton")
def test_compile_fullgraph_with_a_one_input_gate(device):
    gate_pre = torch.randn(2, 5, 4, device=device, requires_grad=True)
    gate_bias = torch.randn(4, device=device, requires_grad=True)
    compiled = torch.compile(lambda p, b: log_gates_from_projection(p, b, gate="forgetting"), backend="aot_eager",
                             fullgraph=True)
    compiled(gate_pre, gate_bias).sum().backward()
    expected = torch.sigmoid(-(gate_pre + gate_bias)).detach()
    torch.testing.assert_close(gate_pre.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate_bias.grad, expected.sum((0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", GATE_NAMES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@use_backend("torch")
def test_torch_path_compiles_fullgraph(gate, grad):
    """The PyTorch path inside torch.compile(fullgraph=True), with gradients and under
    no_grad (compiled decoding steps): the values of the eager call."""
    torch._dynamo.reset()
    spec = gate_spec(gate)
    gate_pre = torch.randn(2, 5, spec.inputs_per_head * 3, requires_grad=grad)
    bias = torch.randn(3)
    compiled = torch.compile(lambda p, b: log_gates_from_projection(p, b, gate=gate), backend="aot_eager",
                             fullgraph=True)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(compiled(gate_pre, bias), log_gates_from_projection(gate_pre, bias, gate=gate))


# ----------------------------------------------------------------------------------------
# Errors: a gate's number of inputs
# ----------------------------------------------------------------------------------------


def test_inputs_must_match_the_gate():
    a = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"the 'forgetting' gate takes one input per head \(a\); beta_pre must be None"):
        compute_log_gates(a, a, gate="forgetting")
    with pytest.raises(ValueError, match=r"the 'sharpened' gate takes two inputs per head \(a, beta_pre\)"):
        compute_log_gates(a)
    with pytest.raises(ValueError, match="unknown gate 'sigmoid'; registered gates are"):
        compute_log_gates(a, gate="sigmoid")
    with pytest.raises(ValueError, match=r"gate_bias must have shape \[6\]"):
        log_gates_from_projection(torch.randn(2, 5, 6), torch.randn(3), gate="forgetting")
    q, kv, x = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 10)
    with pytest.raises(ValueError, match=r"gate_weight must have shape \[1 \* query_heads, model_dim\] = \[4, 10\] "
                                         r"\(the 'forgetting' gate's rows: a \(HQ rows\)\)"):
        gated_fwa_attention(q, kv, kv, x, torch.randn(8, 10), None, gate="forgetting")
    with pytest.raises(ValueError, match=r"gate_pre must have shape \[batch, seqlen, 1 \* query_heads\] = \[1, 6, 4\]"):
        gate_attention_from_projection(q, kv, kv, torch.randn(1, 6, 8), None, gate="forgetting")
