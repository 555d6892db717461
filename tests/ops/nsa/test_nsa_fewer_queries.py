"""nsa_attention with fewer queries than keys (T_q <= T_k, queries at the last key positions,
as in chunked prefill, speculative decoding and fla's parallel_nsa(q[:, -T_q:], k, v) tests):
the PyTorch path and the Triton kernels (TRITON_INTERPRET=1 on the CPU, both work splits of
the selected branch) against the float64 reference on o and every gradient; "the full call,
then its last T_q rows" equals "the call with the last T_q queries" for o and dq, packed and
not, groups 1 and > 1; and the errors for arguments that do not fit."""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.nsa import launch, nsa_attention

# Backend, and for Triton the selected branch's work split (launch.TUNING's block_major_max_group).
BACKENDS = {"torch": None, "triton-query-major": 0, "triton-block-major": 1 << 20}
BRANCH_GATES = ("g_cmp", "g_slc", "g_swa")


@pytest.fixture(params=list(BACKENDS))
def backend(monkeypatch, override_tuning, request):
    """Every path: PyTorch, and the Triton kernels with outputs poisoned with NaN (any row a
    kernel fails to write shows), query-major and block-major."""
    if request.param == "torch":
        with use_backend("torch"):
            yield request.param
        return
    override_tuning(launch.TUNING, block_major_max_group=BACKENDS[request.param])
    monkeypatch.setattr(launch, "allocate_like", lambda x: torch.full_like(x, float("nan")))
    monkeypatch.setattr(launch, "allocate_indices", lambda shape, device: torch.full(
        shape, -7, dtype=torch.int32, device=device))
    with use_backend("triton"):
        yield request.param


def offsets(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def last_queries(x: torch.Tensor, query_lengths, key_lengths) -> torch.Tensor:
    """The rows of x [1, sum(key_lengths), ...] of each packed sequence's last queries."""
    starts = offsets(key_lengths, "cpu").tolist()
    rows = [torch.arange(end - n, end) for n, end in zip(query_lengths, starts[1:])]
    return x[:, torch.cat(rows).to(x.device)]


def shorten(q, gates, keep):
    """q and the branch gates cut to the queries `keep` picks (g stays: it covers the keys)."""
    return keep(q), {name: (t if name == "g" or t is None else keep(t)) for name, t in gates.items()}


# (batch, T_k, T_q, q heads, kv heads, head dim, block size, block counts): groups 1 and 4,
# a block of 40 keys (several 16-key tiles of the interpreter's kernels), queries starting
# inside a block.
CASES = [
    (2, 50, 19, 2, 2, 16, 16, 3),
    (1, 130, 30, 4, 1, 16, 40, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Tk{}-Tq{}-HQ{}-H{}-D{}-bs{}-S{}".format(*c))
def test_fewer_queries_match_the_reference(backend, device, case, make_inputs, check_nsa):
    batch, seqlen_k, seqlen_q, q_heads, kv_heads, head_dim, block_size, block_counts = case
    q, k, v, gates = make_inputs(batch, seqlen_k, q_heads, kv_heads, head_dim, torch.float32, device,
                                 block_size=block_size)
    q, gates = shorten(q, gates, lambda x: x[:, -seqlen_q:])
    check_nsa(q, k, v, gates, block_size=block_size, block_counts=block_counts, window_size=12)


def test_fewer_queries_packed_match_the_reference(backend, device, make_inputs, check_nsa):
    """Per sequence (queries, keys): none of 12 keys, (1, 1), 5 of 37, as many as keys, 9 of
    50, and an empty sequence."""
    query_lengths, key_lengths = [0, 1, 5, 17, 9, 0], [12, 1, 37, 17, 50, 0]
    q, k, v, gates = make_inputs(1, sum(key_lengths), 4, 2, 16, torch.float32, device)
    q, gates = shorten(q, gates, lambda x: last_queries(x, query_lengths, key_lengths))
    check_nsa(q, k, v, gates, block_counts=3, window_size=12, cu_seqlens_q=offsets(query_lengths, device),
              cu_seqlens_k=offsets(key_lengths, device))


@pytest.mark.parametrize("packed, heads", [(False, (2, 2)), (True, (4, 1))], ids=["unpacked-group1", "packed-group4"])
def test_last_queries_equal_the_full_call(backend, device, packed, heads, make_inputs):
    """The call with the last T_q queries gives the full call's last T_q rows of o and dq (the
    full call's earlier rows getting no output gradient), and its selection for them."""
    query_lengths, key_lengths = ([7, 20], [30, 41]) if packed else ([23], [56])
    q, k, v, gates = make_inputs(1, sum(key_lengths), *heads, 16, torch.float32, device, block_size=8)
    keep = (lambda x: last_queries(x, query_lengths, key_lengths)) if packed else (lambda x: x[:, -query_lengths[0]:])
    full_offsets = dict(cu_seqlens=offsets(key_lengths, device)) if packed else {}
    short_offsets = dict(cu_seqlens_q=offsets(query_lengths, device), cu_seqlens_k=offsets(key_lengths, device)) \
        if packed else {}
    options = dict(block_size=8, block_counts=3, window_size=10, return_block_indices=True)

    def run(q, gates, offsets_of_call, do):
        q = q.detach().clone().requires_grad_()
        o, indices = nsa_attention(q, k, v, **gates, **offsets_of_call, **options)
        return o.detach(), torch.autograd.grad(o, q, do)[0], indices

    q_short, gates_short = shorten(q, gates, keep)
    do_short = torch.randn_like(q_short)
    do_full = torch.zeros_like(q)
    kept_rows = keep(torch.arange(q.shape[1], device=device)[None, :]).flatten()
    do_full[:, kept_rows] = do_short
    o_full, dq_full, indices_full = run(q, gates, full_offsets, do_full)
    o_short, dq_short, indices_short = run(q_short, gates_short, short_offsets, do_short)
    torch.testing.assert_close(o_short, keep(o_full), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq_short, keep(dq_full), rtol=1e-4, atol=1e-5)
    assert torch.equal(indices_short, keep(indices_full))


def test_given_block_indices_follow_the_key_positions(device, make_inputs):
    """Given block indices are checked against each query's key position: the own block of the
    last queries of 40 keys (blocks of 16) is block 2, whatever their row in q."""
    q, k, v, gates = make_inputs(1, 40, 2, 1, 16, torch.float32, device, branches=("slc",))
    rows = torch.tensor([0, 2], dtype=torch.int32, device=device).expand(1, 4, 1, 2)
    with use_backend("torch"):
        o, used = nsa_attention(q[:, -4:], k, v, g_slc=gates["g_slc"][:, -4:], block_size=16, block_indices=rows,
                                return_block_indices=True)
        assert torch.equal(used, rows)
        with pytest.raises(ValueError, match="after the query's own block"):
            nsa_attention(q[:, -4:], k, v, g_slc=gates["g_slc"][:, -4:], block_size=16, block_indices=rows + 1)


def error_inputs(seqlen_q=5, seqlen_k=8):
    q = torch.randn(1, seqlen_q, 2, 16)
    k, v = torch.randn(1, seqlen_k, 1, 16), torch.randn(1, seqlen_k, 1, 16)
    return dict(q=q, k=k, v=v, g=-torch.rand(1, seqlen_k, 2), g_cmp=torch.rand(1, seqlen_q, 2),
                g_slc=torch.rand(1, seqlen_q, 2), g_swa=torch.rand(1, seqlen_q, 2), block_size=4, window_size=3)


OFFSETS = torch.tensor([0, 3, 8], dtype=torch.int32)
BAD_ARGS = [
    (dict(q=torch.randn(1, 9, 2, 16), g_cmp=None, g_slc=None, g_swa=torch.rand(1, 9, 2)), "q must not be longer than k"),
    (dict(q=torch.randn(2, 5, 2, 16)), "q and k must agree in batch"),
    (dict(g=-torch.rand(1, 5, 2)), r"g must have shape \[batch, seqlen, query_heads\] = \[1, 8, 2\]"),
    (dict(g_cmp=torch.rand(1, 8, 2)), r"g_cmp must have shape \[batch, seqlen, query_heads\] = \[1, 5, 2\]"),
    (dict(cu_seqlens=OFFSETS), "give cu_seqlens_q and cu_seqlens_k"),
    (dict(cu_seqlens=OFFSETS, cu_seqlens_q=OFFSETS, cu_seqlens_k=OFFSETS), "not both"),
    (dict(cu_seqlens_k=OFFSETS), "go together"),
    (dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32), cu_seqlens_k=OFFSETS), "same number of sequences"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 5], dtype=torch.int32), cu_seqlens_k=OFFSETS),
     r"sequence 0 has more queries \(4, cu_seqlens_q\) than keys \(3, cu_seqlens_k\)"),
    (dict(cu_seqlens_q=torch.tensor([0, 1, 4], dtype=torch.int32), cu_seqlens_k=OFFSETS),
     "cu_seqlens_q must end at the packed length of q"),
    (dict(block_indices=torch.zeros(1, 8, 1, 2, dtype=torch.int32)), r"block_indices must have shape .* = \[1, 5, 1"),
]


@pytest.mark.parametrize("overrides, message", BAD_ARGS, ids=[b[1][:40] for b in BAD_ARGS])
def test_errors_name_the_argument(overrides, message):
    args = error_inputs()
    args.update(overrides)
    with pytest.raises(ValueError, match=message):
        nsa_attention(**args)


def test_fewer_queries_compile_fullgraph(device, make_inputs):
    """With T_q < T_k and no packed sequences the Triton path is still one graph under
    torch.compile(fullgraph=True) (aot_eager); loss and gradients as in eager mode."""
    torch._dynamo.reset()
    q, k, v, gates = make_inputs(1, 40, 4, 2, 16, torch.float32, device, block_size=8)
    q, gates = shorten(q, gates, lambda x: x[:, -13:])

    def loss(q, k, v, g):
        o = nsa_attention(q, k, v, g, gates["g_cmp"], gates["g_slc"], gates["g_swa"], block_size=8, block_counts=2,
                          window_size=6)
        return o.square().mean()

    def loss_and_grads(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gates["g"])]
        value = fn(*leaves)
        return [value.detach(), *torch.autograd.grad(value, leaves)]

    with use_backend("triton"):
        compiled = loss_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
        eager = loss_and_grads(loss)
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dg"), compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
