"""Gated window attention: Triton kernels and the chunked PyTorch path against the float64
naive reference, with the rule of docs/correctness.md (error <= 2x the naive path's own error
in the same precision + 1e-5), for outputs and every gradient.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py), so sizes
stay small; T is never a multiple of the tile sizes the interpreter uses (16 and 32).
"""

from __future__ import annotations

import pytest
import torch

from gatedfwa import flash_gated_window_attention, gated_window_attention
from gatedfwa.ops.window_attention import backward as triton_backward
from gatedfwa.ops.window_attention import launch
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention
from gatedfwa.ops.window_attention.torch_path import chunked_gated_window_attention
from gatedfwa.testing import assert_within_rule, max_abs_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# (head_dim, q_heads, kv_heads, window, gate, seqlen): every head dim, both GQA ratios,
# every window kind and both gate settings appear, without the full cartesian product.
KERNEL_CASES = [
    (32, 4, 1, 1, True, 45),
    (32, 2, 2, None, False, 45),
    (60, 4, 1, 16, True, 77),
    (60, 2, 2, 64, False, 70),
    (64, 2, 2, 16, True, 77),
    (64, 4, 1, 200, True, 61),   # window longer than the sequence
    (100, 2, 2, None, True, 50),
    (100, 4, 1, 64, True, 83),
    (128, 4, 1, 16, False, 40),
    (128, 2, 2, 64, True, 70),
]


def case_id(case):
    d, hq, h, w, gate, t = case
    return f"D{d}-HQ{hq}H{h}-w{w}-{'gate' if gate else 'nogate'}-T{t}"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_triton_kernels_bf16(triton_backend, device, case, make_inputs, check_against_reference, triton_op):
    head_dim, q_heads, kv_heads, window, gate, seqlen = case
    q, k, v, g = make_inputs(2, seqlen, q_heads, kv_heads, head_dim, gate, torch.bfloat16, device)
    check_against_reference(triton_op, q, k, v, g, window)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("window", [16, None])
def test_triton_kernels_other_dtypes(triton_backend, device, dtype, window, make_inputs, check_against_reference,
                                     triton_op):
    q, k, v, g = make_inputs(1, 53, 4, 2, 48, True, DTYPES[dtype], device)
    check_against_reference(triton_op, q, k, v, g, window)


@pytest.mark.parametrize("window", [1, 7, None])
@pytest.mark.parametrize("gate", [True, False])
def test_triton_kernels_varlen(triton_backend, device, window, gate, make_inputs, check_against_reference, triton_op):
    # Empty and length-1 sequences, and lengths that straddle tile boundaries.
    cu_seqlens = torch.tensor([0, 0, 1, 18, 18, 51, 52, 90], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, 90, 4, 2, 32, gate, torch.bfloat16, device)
    check_against_reference(triton_op, q, k, v, g, window, cu_seqlens)


def test_triton_varlen_equals_separate_calls(triton_backend, device, make_inputs):
    """Packing must not let attention or the gate sum cross a sequence boundary."""
    cu_seqlens = torch.tensor([0, 21, 50], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, 50, 2, 1, 32, True, torch.float32, device)
    packed = gated_window_attention(q, k, v, g, window_size=9, cu_seqlens=cu_seqlens)
    for start, end in ((0, 21), (21, 50)):
        alone = gated_window_attention(q[:, start:end], k[:, start:end], v[:, start:end], g[:, start:end], window_size=9)
        torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-5, atol=1e-5)


# Tile sides (forward M x N, dq M x N, dk/dv M x N) with a gate chunk of 16: every kernel
# has tiles of several chunks on the key side, the query side, or both.
SEVERAL_CHUNK_TILES = {
    "keys": ((64, 32), (32, 16), (16, 64)),
    "queries": ((32, 16), (64, 32), (32, 64)),
}


@pytest.mark.parametrize("tiles", list(SEVERAL_CHUNK_TILES))
@pytest.mark.parametrize("window", [40, None])
def test_triton_tiles_of_several_gate_chunks(triton_backend, device, override_tuning, window, tiles, make_inputs,
                                             check_against_reference, triton_op):
    """Tiles that span 2 and 4 chunks of the gate sums (the kernels add the totals of the
    tile's other chunks), varlen, against the reference."""
    sides = dict(zip(("forward", "dq", "dkdv"), SEVERAL_CHUNK_TILES[tiles]))
    rules = {
        kernel: (lambda m, n: lambda arch, block_d, gate: dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=1))(
            *sides[kernel])
        for kernel in sides
    }
    override_tuning(launch.TUNING, rules=rules)
    assert launch.gate_chunk(32, torch.device(device)) == 16
    # The last sequence is long enough for query tiles of several chunks past a key block.
    cu_seqlens = torch.tensor([0, 70, 71, 200], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, 200, 2, 1, 32, True, torch.bfloat16, device)
    check_against_reference(triton_op, q, k, v, g, window, cu_seqlens)


def extreme_gates(shape, gate_value, device):
    """Mostly extreme gates (between gate_value and half of it), every 5th one ordinary."""
    g = gate_value * (0.5 + 0.5 * torch.rand(*shape, device=device))
    g[:, ::5] = -0.1
    return g


@pytest.mark.parametrize("gate_value", [-1e4, -30.0])
def test_triton_extreme_gates_bf16(triton_backend, device, gate_value, make_inputs, check_against_reference, triton_op):
    q, k, v, _ = make_inputs(1, 100, 2, 2, 32, False, torch.bfloat16, device)
    g = extreme_gates((1, 100, 2), gate_value, device)
    fast = check_against_reference(triton_op, q, k, v, g, 16)
    for t in (fast[0], fast[1], *fast[2]):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("gate_value", [-1e4, -30.0])
def test_triton_extreme_gates_fp32(triton_backend, device, gate_value, make_inputs, run_with_grads, triton_op,
                                   naive_op):
    """With |g| ~ 1e4 every decay sum is ~1e5 and rounds at ~1e-2 in float32, in any prefix-sum
    formulation. The forward meets the usual rule. The naive path's backward reuses its one
    probability matrix; the kernels recompute probabilities from other tile-local sums, and
    the cancellation in dS = P (dP - delta) amplifies the difference: gradients are held to
    16x the naive error here (bf16, above, meets the usual rule)."""
    q, k, v, _ = make_inputs(1, 100, 2, 2, 32, False, torch.float32, device)
    g = extreme_gates((1, 100, 2), gate_value, device)
    do = torch.randn_like(q)
    fast = run_with_grads(triton_op, q, k, v, g, do, window_size=16, cu_seqlens=None)
    low = run_with_grads(naive_op, q, k, v, g, do, window_size=16, cu_seqlens=None)
    ref = run_with_grads(naive_op, *(x.double() for x in (q, k, v, g)), do.double(), window_size=16, cu_seqlens=None)
    assert_within_rule("o", fast[0], low[0], ref[0])
    assert_within_rule("lse", fast[1], low[1], ref[1], atol=1e-4)
    for name, a, b, c in zip(("dq", "dk", "dv", "dg"), fast[2], low[2], ref[2]):
        assert torch.isfinite(a).all(), name
        assert_within_rule(name, a, b, c, factor=16.0, atol=1e-4)


@pytest.mark.parametrize("case", KERNEL_CASES[:6], ids=case_id)
def test_chunked_path(device, case, make_inputs, check_against_reference, chunked_op):
    head_dim, q_heads, kv_heads, window, gate, seqlen = case
    q, k, v, g = make_inputs(2, seqlen, q_heads, kv_heads, head_dim, gate, torch.bfloat16, device)
    check_against_reference(chunked_op, q, k, v, g, window)


@pytest.mark.parametrize("window", [1, 5, None])
def test_chunked_path_varlen_fp32(device, window, make_inputs, check_against_reference, chunked_op):
    cu_seqlens = torch.tensor([0, 0, 1, 30, 30, 64], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, 64, 4, 1, 24, True, torch.float32, device)
    check_against_reference(chunked_op, q, k, v, g, window, cu_seqlens)


def test_chunked_extreme_gates(device, make_inputs, check_against_reference, chunked_op):
    q, k, v, _ = make_inputs(1, 100, 2, 2, 16, False, torch.float32, device)
    g = -1e4 * (0.5 + 0.5 * torch.rand(1, 100, 2, device=device))
    g[:, ::3] = 0.0
    fast = check_against_reference(chunked_op, q, k, v, g, 12)
    assert all(torch.isfinite(t).all() for t in (fast[0], *fast[2]))


def test_naive_reference_gradcheck(make_inputs):
    q, k, v, g = make_inputs(1, 9, 2, 1, 4, True, torch.float64, "cpu")
    inputs = [x.requires_grad_() for x in (q, k, v, g)]
    assert torch.autograd.gradcheck(
        lambda *xs: naive_gated_window_attention(*xs, window_size=4)[0], inputs, eps=1e-6, atol=1e-5
    )


def test_long_sequence_error_does_not_grow_with_position(device, make_inputs):
    """T = 2^20 in one sequence, gates around -0.01, fp32: the error of the last 1000
    positions is no worse than that of the first 1000. A global fp32 cumulative sum of the
    gates would reach ~1e4 here and lose ~1e-3 absolute in every decay difference."""
    seqlen, window, head_dim = 2**20, 32, 16
    q, k, v, _ = make_inputs(1, seqlen, 1, 1, head_dim, False, torch.float32, device)
    g = -0.01 * (1 + 0.5 * torch.rand(1, seqlen, 1, device=device))
    with torch.no_grad():
        o, _ = chunked_gated_window_attention(q, k, v, g, window_size=window)

    def error_of(rows: slice) -> float:
        # Rows only see the window before them, and decay differences are shift invariant:
        # the float64 reference of a slice (with one window of history) is exact for them.
        start = max(rows.start - window, 0)
        ref, _ = naive_gated_window_attention(
            *(x[:, start:rows.stop].double() for x in (q, k, v, g)), window_size=window
        )
        return max_abs_error(o[:, rows], ref[:, rows.start - start:])

    head, tail = error_of(slice(0, 1000)), error_of(slice(seqlen - 1000, seqlen))
    assert tail <= 2 * head + 1e-6, (head, tail)


def test_gate_gradient_error_does_not_grow_along_the_sequence(triton_backend, device, make_inputs):
    """dg summed as a reverse cumulative sum over the whole sequence of (row sums - column
    sums) of dS would accumulate any mismatch between the two towards the start; the kernels
    sum nothing over more than a window (gate_flux.py, tests/ops/window_attention/test_gate_flux.py for the
    same at T = 2^18 on the assembly alone). fp32, T = 2048: the dg
    error over the first 256 positions stays that of the last 256 (float64 references on
    slices with one window of context each side are exact for the slice). An earlier
    scheme (row and column sums as tensor-core products with ones, row sums added
    atomically across key blocks) failed this: head 9.4e-6 against tail 2.8e-6."""
    seqlen, window, span = 2048, 16, 256
    q, k, v, _ = make_inputs(1, seqlen, 1, 1, 16, False, torch.float32, device)
    g = -0.05 * (1 + torch.rand(1, seqlen, 1, device=device))
    do = torch.randn_like(q)
    g_leaf = g.clone().requires_grad_()
    o = gated_window_attention(q, k, v, g_leaf, window_size=window)
    (dg,) = torch.autograd.grad(o, g_leaf, do)

    def error_of(start: int, stop: int) -> float:
        lo, hi = max(start - window, 0), min(stop + window, seqlen)
        pieces = [x[:, lo:hi].double().requires_grad_() for x in (q, k, v, g)]
        ref, _ = naive_gated_window_attention(*pieces, window_size=window)
        (dg_ref,) = torch.autograd.grad(ref, pieces[3], do[:, lo:hi].double())
        return max_abs_error(dg[:, start:stop], dg_ref[:, start - lo:stop - lo])

    head, tail = error_of(0, span), error_of(seqlen - span, seqlen)
    assert head <= 2 * tail + 1e-6, (head, tail)


def test_one_token_per_sequence_with_odd_strides(triton_backend, device, make_inputs, check_against_reference,
                                                 triton_op):
    """T == 1 and B > 1, inputs whose size-1 time dimension carries a stride other than the
    batch stride (they are still contiguous): the kernels must step tokens by the batch
    stride, not by that stride."""
    q, k, v, g = make_inputs(3, 1, 2, 1, 16, True, torch.float32, device)

    def odd(x):
        # [B, 1, H, D] with stride 1 in the time dimension, equal values.
        y = x.clone().as_strided(x.shape, (x.stride(0), 1, x.stride(2), 1))
        assert y.is_contiguous() and y.stride(1) != y.stride(0)
        return y

    check_against_reference(triton_op, odd(q), odd(k), odd(v), g, 4)


@pytest.mark.parametrize("cu_seqlens", [None, [0, 70, 71, 200], [0, 0, 130, 130, 200]])
def test_reverse_cumsum_within_sequences(cu_seqlens, device):
    """The dg scan kernel against a float64 PyTorch reverse sum per sequence: several blocks
    per sequence (the interpreter's block is 64), a sequence of one position, empty ones."""
    heads, seqlen = 3, 200
    batch = 2 if cu_seqlens is None else 1
    du = torch.randn(batch, heads, seqlen, device=device) * torch.logspace(-6, 2, seqlen, device=device)
    bounds = [(0, seqlen)] if cu_seqlens is None else list(zip(cu_seqlens[:-1], cu_seqlens[1:]))
    expected = torch.zeros(batch, heads, seqlen, dtype=torch.float64, device=device)
    for start, stop in bounds:
        piece = du[..., start:stop].double()
        expected[..., start:stop] = piece.flip(-1).cumsum(-1).flip(-1)
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    dg = triton_backward._reverse_cumsum_within_sequences(du, offsets)
    assert dg.dtype == torch.float32
    # float32 rounding of the float64 sum, nothing more.
    torch.testing.assert_close(dg.double(), expected, rtol=2 ** -23, atol=0)


def test_backend_selection(monkeypatch, device, make_inputs):
    q, k, v, g = make_inputs(1, 20, 2, 2, 16, True, torch.float32, device)
    monkeypatch.setenv("GATEDFWA_BACKEND", "torch")
    torch_out = gated_window_attention(q, k, v, g, window_size=6)
    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    triton_out = gated_window_attention(q, k, v, g, window_size=6)
    torch.testing.assert_close(torch_out, triton_out, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("GATEDFWA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="GATEDFWA_BACKEND"):
        gated_window_attention(q, k, v, g)


def test_flash_alias_matches(device, make_inputs):
    q, k, v, g = make_inputs(1, 30, 2, 1, 16, True, torch.float32, device)
    a = gated_window_attention(q, k, v, g, window_size=8, scale=0.3)
    b = flash_gated_window_attention(q, k, v, g, window_size=(7, 0), softmax_scale=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    full = flash_gated_window_attention(q, k, v, g, window_size=(-1, 0))
    torch.testing.assert_close(full, gated_window_attention(q, k, v, g), rtol=0, atol=0)
    with pytest.raises(ValueError, match="right"):
        flash_gated_window_attention(q, k, v, g, window_size=(7, 3))
    with pytest.raises(TypeError, match="window_size"):
        flash_gated_window_attention(q, k, v, g, window_size=8)


@pytest.mark.parametrize("gated", [False, True])
def test_eager_path_matches_custom_op(triton_backend, device, gated, make_inputs):
    """Eager calls take an autograd.Function instead of the custom op (less host work); both
    run the same kernels, so outputs and gradients agree bit for bit."""
    from gatedfwa.ops.window_attention import op as window_op

    q, k, v, g = make_inputs(1, 37, 2, 1, 16, gated, torch.float32, device)
    do = torch.randn_like(q)
    results = []
    for via_op in (False, True):
        inputs = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, g)]
        if via_op:
            o = window_op._window_attention.op(*inputs, 8, 0.25, None)[0]
        else:
            o = gated_window_attention(*inputs, window_size=8, scale=0.25)
        o.backward(do)
        results.append([o.detach()] + [x.grad for x in inputs if x is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiles_fullgraph_with_triton_op(triton_backend, device, make_inputs):
    """The custom op (forward and registered backward) does not break torch.compile's graph.
    aot_eager exercises dynamo capture and AOT autograd without generating C++ code."""
    q, k, v, g = make_inputs(1, 37, 2, 1, 16, True, torch.float32, device)
    proj = torch.nn.Linear(16, 16).to(device)

    def block(q, k, v, g):
        o = gated_window_attention(q, k, v, g, window_size=8)
        return proj(o).square().mean()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    loss = compiled(*leaves)
    loss.backward()
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    block(*eager_leaves).backward()
    torch.testing.assert_close(loss, block(q, k, v, g))
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


BAD_ARGS = [
    (dict(q=torch.randn(2, 8, 4)), ValueError, "q must have 4 dimensions"),
    (dict(k=torch.randn(2, 7, 2, 16), v=torch.randn(2, 7, 2, 16)), ValueError, "q must not be longer than k"),
    (dict(v=torch.randn(2, 8, 2, 8)), ValueError, "k and v must have the same shape"),
    (dict(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)), ValueError, "multiple"),
    (dict(q=torch.randn(2, 8, 4, 300), k=torch.randn(2, 8, 2, 300), v=torch.randn(2, 8, 2, 300)), ValueError, "head_dim"),
    (dict(q=torch.randn(2, 8, 4, 16, dtype=torch.float16)), TypeError, "share one dtype"),
    (dict(q=torch.randint(0, 3, (2, 8, 4, 16))), TypeError, "q must be float16"),
    (dict(g=torch.randn(2, 8, 2)), ValueError, "g must have shape"),
    (dict(window_size=0), ValueError, "window_size must be >= 1"),
    (dict(window_size=2.5), TypeError, "window_size must be an int"),
    (dict(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "batch size must be 1"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_ARGS, ids=[b[2] for b in BAD_ARGS])
def test_validation_errors(overrides, error, message):
    args = dict(q=torch.randn(2, 8, 4, 16), k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16),
                g=None, window_size=4, cu_seqlens=None)
    args.update(overrides)
    with pytest.raises(error, match=message):
        gated_window_attention(**args)


@pytest.mark.parametrize(
    "cu_seqlens,message",
    [
        (torch.tensor([0, 3, 8], dtype=torch.float32), "int32"),
        (torch.tensor([1, 3, 8], dtype=torch.int32), "start at 0"),
        (torch.tensor([0, 5, 3, 8], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 3, 7], dtype=torch.int32), "end at"),
        (torch.tensor([[0, 8]], dtype=torch.int32), "1-D"),
    ],
)
def test_cu_seqlens_validation(cu_seqlens, message):
    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises((ValueError, TypeError), match=message):
        gated_window_attention(q, k, v, cu_seqlens=cu_seqlens)


def positive_gate():
    g = -torch.rand(2, 8, 4)
    g[1, 3, 2] = 0.5
    return g


def nan_gate():
    g = -torch.rand(2, 8, 4)
    g[0, 7, 0] = float("nan")
    return g


def infinite_gate():
    g = -torch.rand(2, 8, 4)
    g[0, 0, 1] = float("-inf")
    return g


@pytest.mark.parametrize("make_gate", [positive_gate, nan_gate, infinite_gate])
def test_gate_values_are_checked_on_cpu(make_gate):
    """A log gate > 0, NaN or infinite is rejected on CPU tensors (no device sync needed there)."""
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="g must hold finite log gates <= 0; 1 of 64"):
        gated_window_attention(q, k, v, make_gate(), window_size=4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cu_seqlens_int32_and_int64(dtype, device):
    q, k, v = (torch.randn(1, 9, 2, 16, device=device) for _ in range(3))
    offsets = torch.tensor([0, 4, 9], dtype=dtype, device=device)
    torch.testing.assert_close(
        gated_window_attention(q, k, v, window_size=3, cu_seqlens=offsets),
        gated_window_attention(q, k, v, window_size=3, cu_seqlens=offsets.to(torch.int32)),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels with their real tile sizes")
@pytest.mark.parametrize("head_dim,q_heads,kv_heads,window", [(128, 4, 4, 300), (64, 8, 2, 1000), (80, 4, 1, None), (256, 2, 2, 200)])
def test_triton_kernels_gpu_many_tiles(triton_backend, head_dim, q_heads, kv_heads, window, make_inputs,
                                       check_against_reference, triton_op):
    """Sequences spanning many tiles of the GPU tile sizes, with masked and unmasked tiles."""
    q, k, v, g = make_inputs(2, 1500, q_heads, kv_heads, head_dim, True, torch.bfloat16, "cuda")
    check_against_reference(triton_op, q, k, v, g, window)
    cu_seqlens = torch.tensor([0, 1, 700, 700, 1500], dtype=torch.int32, device="cuda")
    check_against_reference(triton_op, q[:1], k[:1], v[:1], g[:1], window, cu_seqlens)
