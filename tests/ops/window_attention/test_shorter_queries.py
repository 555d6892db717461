"""Gated window attention with fewer queries than keys (T_q <= T_k, queries aligned to the
last keys): the Triton kernels (interpreter on the CPU) and the chunked PyTorch path against
the float64 naive reference under the rule of docs/correctness.md, for o, lse, dq, dk, dv and
dg (the gates cover the key positions), and the errors for arguments that do not fit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatedfwa import gated_window_attention
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention
from gatedfwa.ops.window_attention.torch_path import chunked_gated_window_attention
from gatedfwa.testing import assert_within_rule, float32_slack


def make_inputs(batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, gate, dtype, device):
    q = torch.randn(batch, seqlen_q, q_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, device=device, dtype=dtype)
    g = None
    if gate:
        g = F.logsigmoid(torch.randn(batch, seqlen_k, q_heads, device=device) * 2 + 1)
    return q, k, v, g


def public_op(q, k, v, g, window_size, cu_seqlens_q, cu_seqlens_k):
    return gated_window_attention(q, k, v, g, window_size=window_size, cu_seqlens_q=cu_seqlens_q,
                                  cu_seqlens_k=cu_seqlens_k, return_lse=True)


def chunked_op(q, k, v, g, window_size, cu_seqlens_q, cu_seqlens_k):
    return chunked_gated_window_attention(q, k, v, g, window_size=window_size, cu_seqlens=cu_seqlens_k,
                                          cu_seqlens_q=cu_seqlens_q)


def naive_op(q, k, v, g, window_size, cu_seqlens_q, cu_seqlens_k):
    return naive_gated_window_attention(q, k, v, g, window_size=window_size, cu_seqlens=cu_seqlens_k,
                                        cu_seqlens_q=cu_seqlens_q)


def run_with_grads(fn, q, k, v, g, do, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    gate = None if g is None else g.detach().clone().requires_grad_()
    o, lse = fn(*leaves, gate, **kwargs)
    inputs = leaves + ([gate] if gate is not None else [])
    return o.detach(), lse.detach(), torch.autograd.grad(o, inputs, do)


def check_against_reference(fast_fn, q, k, v, g, window_size, cu_seqlens_q=None, cu_seqlens_k=None):
    do = torch.randn_like(q)
    kwargs = dict(window_size=window_size, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    fast = run_with_grads(fast_fn, q, k, v, g, do, **kwargs)
    low = run_with_grads(naive_op, q, k, v, g, do, **kwargs)
    as64 = [x.double() for x in (q, k, v)] + [None if g is None else g.double()]
    ref = run_with_grads(naive_op, *as64, do.double(), **kwargs)
    names = ("o", "lse", "dq", "dk", "dv", "dg")
    for name, a, b, c in zip(names, (fast[0], fast[1], *fast[2]), (low[0], low[1], *low[2]), (ref[0], ref[1], *ref[2])):
        assert_within_rule(name, a, b, c, atol=float32_slack(c, q.dtype))


# (head_dim, q_heads, kv_heads, window, gate, seqlen_q, seqlen_k). T_k - T_q is 30 or 57:
# windows shorter than it (only keys before the first query are cut off for some queries)
# and longer (every query reaches back past the first query), full causal, GQA, a head size
# that is not a power of two, a single query.
CASES = [
    (32, 4, 1, 7, True, 21, 51),
    (40, 2, 2, 64, True, 21, 51),
    (40, 4, 2, None, False, 20, 77),
    (64, 4, 1, 16, False, 20, 77),
    (48, 2, 1, 45, True, 1, 40),
]


def case_id(case):
    d, hq, h, w, gate, tq, tk = case
    return f"D{d}-HQ{hq}H{h}-w{w}-{'gate' if gate else 'nogate'}-Tq{tq}-Tk{tk}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("path", ["triton", "chunked"])
def test_shorter_queries(triton_backend, device, case, path):
    head_dim, q_heads, kv_heads, window, gate, seqlen_q, seqlen_k = case
    q, k, v, g = make_inputs(2, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, gate, torch.bfloat16, device)
    check_against_reference(public_op if path == "triton" else chunked_op, q, k, v, g, window)


@pytest.mark.parametrize("window", [1, 6, 40])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("path", ["triton", "chunked"])
def test_shorter_queries_varlen(triton_backend, device, window, gate, path):
    # Per sequence (queries, keys): (0, 12) no queries, (1, 1), (3, 30) with T_k - T_q > w
    # for the shorter windows, (17, 17) as many as keys, (9, 33) straddling tiles, (0, 0).
    query_lengths, key_lengths = [0, 1, 3, 17, 9, 0], [12, 1, 30, 17, 33, 0]
    cu_seqlens_q = torch.tensor([0, *torch.tensor(query_lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_seqlens_k = torch.tensor([0, *torch.tensor(key_lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, sum(query_lengths), sum(key_lengths), 4, 2, 24, gate, torch.bfloat16, device)
    check_against_reference(public_op if path == "triton" else chunked_op, q, k, v, g, window, cu_seqlens_q, cu_seqlens_k)


def test_shorter_queries_fp32(triton_backend, device):
    q, k, v, g = make_inputs(1, 19, 60, 2, 2, 32, True, torch.float32, device)
    check_against_reference(public_op, q, k, v, g, 25)


def test_last_queries_equal_the_full_call(device):
    """Keeping the last T_q queries gives the last T_q rows of the call with every query, and
    the same gradients for k, v and g (the earlier queries' output gradient being zero)."""
    q, k, v, g = make_inputs(1, 50, 50, 2, 1, 32, True, torch.float32, device)
    do = torch.randn(1, 20, 2, 32, device=device)
    full = run_with_grads(gated_window_attention_lse, q, k, v, g, torch.cat([torch.zeros_like(q[:, :30]), do], 1),
                          window_size=9)
    short = run_with_grads(gated_window_attention_lse, q[:, 30:], k, v, g, do, window_size=9)
    torch.testing.assert_close(short[0], full[0][:, 30:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short[1], full[1][..., 30:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short[2][0], full[2][0][:, 30:], rtol=1e-4, atol=1e-5)
    for a, b in zip(short[2][1:], full[2][1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def gated_window_attention_lse(q, k, v, g, window_size):
    return gated_window_attention(q, k, v, g, window_size=window_size, return_lse=True)


def test_cu_seqlens_means_both_sides(device):
    """cu_seqlens alone, or the same offsets as cu_seqlens_q and cu_seqlens_k, give one result."""
    offsets = torch.tensor([0, 13, 40], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, 40, 40, 2, 1, 16, True, torch.float32, device)
    both = gated_window_attention(q, k, v, g, window_size=5, cu_seqlens=offsets)
    sides = gated_window_attention(q, k, v, g, window_size=5, cu_seqlens_q=offsets.clone(), cu_seqlens_k=offsets)
    torch.testing.assert_close(sides, both, rtol=1e-5, atol=1e-6)


OFFSETS = torch.tensor([0, 3, 8], dtype=torch.int32)
BAD_ARGS = [
    (dict(q=torch.randn(1, 9, 2, 16)), ValueError, "q must not be longer than k"),
    (dict(g=torch.randn(1, 5, 2).clamp(max=0)), ValueError, "g must have shape"),
    (dict(cu_seqlens=OFFSETS), ValueError, "give cu_seqlens_q and cu_seqlens_k"),
    (dict(cu_seqlens=OFFSETS, cu_seqlens_q=OFFSETS, cu_seqlens_k=OFFSETS), ValueError, "not both"),
    (dict(cu_seqlens_k=OFFSETS), ValueError, "go together"),
    (dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32), cu_seqlens_k=OFFSETS), ValueError,
     "same number of sequences"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 5], dtype=torch.int32), cu_seqlens_k=OFFSETS), ValueError,
     "sequence 0 has more queries"),
    (dict(cu_seqlens_q=torch.tensor([0, 1, 4], dtype=torch.int32), cu_seqlens_k=OFFSETS), ValueError,
     "cu_seqlens_q must end at the packed length of q"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 3, 9], dtype=torch.int32)),
     ValueError, "cu_seqlens_k must end at the packed length of k"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_ARGS, ids=[b[2] for b in BAD_ARGS])
def test_errors(overrides, error, message):
    args = dict(q=torch.randn(1, 5, 2, 16), k=torch.randn(1, 8, 1, 16), v=torch.randn(1, 8, 1, 16),
                g=-torch.rand(1, 8, 2), window_size=4)
    args.update(overrides)
    with pytest.raises(error, match=message):
        gated_window_attention(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels with their real tile sizes")
@pytest.mark.parametrize("head_dim,q_heads,kv_heads,window", [(128, 4, 4, 300), (64, 8, 2, 1000), (80, 4, 1, None), (256, 2, 2, 200)])
def test_shorter_queries_gpu_many_tiles(triton_backend, head_dim, q_heads, kv_heads, window):
    """Queries starting inside a tile of the GPU tile sizes, masked and unmasked tiles."""
    q, k, v, g = make_inputs(2, 700, 1500, q_heads, kv_heads, head_dim, True, torch.bfloat16, "cuda")
    check_against_reference(public_op, q, k, v, g, window)
    cu_seqlens_q = torch.tensor([0, 0, 333, 334, 1034], dtype=torch.int32, device="cuda")
    cu_seqlens_k = torch.tensor([0, 900, 1300, 1301, 2200], dtype=torch.int32, device="cuda")
    q, k, v, g = make_inputs(1, 1034, 2200, q_heads, kv_heads, head_dim, True, torch.bfloat16, "cuda")
    check_against_reference(public_op, q, k, v, g, window, cu_seqlens_q, cu_seqlens_k)


def test_compiles_fullgraph_with_varlen_queries(triton_backend, device):
    """The custom op with cu_seqlens_q and cu_seqlens_k inside torch.compile (aot_eager):
    forward and backward as eager."""
    cu_seqlens_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    cu_seqlens_k = torch.tensor([0, 20, 37], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, 9, 37, 2, 1, 16, True, torch.float32, device)

    def block(q, k, v, g):
        o = gated_window_attention(q, k, v, g, window_size=8, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        return o.square().mean()

    def loss_and_grads(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
        loss = fn(*leaves)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    compiled = loss_and_grads(torch.compile(block, fullgraph=True, backend="aot_eager"))
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dg"), compiled, loss_and_grads(block)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
