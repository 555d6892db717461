"""nsa_attention's PyTorch path (torch_path.py) against the float64 reference: the rule on the
output and every gradient, the selection block for block."""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.nsa import nsa_attention
from gatedfwa.ops.nsa.naive import naive_selected_attention
from gatedfwa.ops.nsa.torch_path import chunked_selected_attention


@pytest.fixture(autouse=True)
def torch_backend():
    with use_backend("torch"):
        yield


# (batch, seqlen, q heads, kv heads, head dim, block size, block counts): GQA groups 1, 2, 4 and
# 16, head dims that are not powers of two, lengths that are not multiples of the block.
CASES = [
    (2, 70, 2, 2, 24, 16, 3),
    (1, 100, 4, 2, 80, 16, 4),
    (2, 61, 4, 1, 32, 8, 5),
    (1, 90, 16, 1, 16, 16, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-HQ{}-H{}-D{}-bs{}-S{}".format(*c))
def test_torch_path(device, case, dtype, make_inputs, check_nsa):
    batch, seqlen, q_heads, kv_heads, head_dim, block_size, block_counts = case
    q, k, v, gates = make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype, device, block_size=block_size)
    check_nsa(q, k, v, gates, block_size=block_size, block_counts=block_counts, window_size=24)


def test_torch_path_varlen(device, make_inputs, check_nsa):
    cu_seqlens = torch.tensor([0, 0, 9, 40, 41, 100], dtype=torch.int32, device=device)
    q, k, v, gates = make_inputs(1, 100, 4, 2, 24, torch.float32, device, block_size=8)
    check_nsa(q, k, v, gates, block_size=8, block_counts=3, window_size=12, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("branches", [("cmp",), ("slc",), ("swa",), ("cmp", "slc")])
def test_torch_path_branch_subsets(device, branches, make_inputs, check_nsa):
    q, k, v, gates = make_inputs(1, 50, 4, 2, 16, torch.float32, device, branches=branches)
    check_nsa(q, k, v, gates)


def test_varlen_equals_separate_calls(device, make_inputs):
    """Nothing crosses a sequence boundary: blocks count from each sequence's start."""
    cu_seqlens = torch.tensor([0, 37, 80], dtype=torch.int32, device=device)
    q, k, v, gates = make_inputs(1, 80, 4, 2, 16, torch.float32, device)
    options = dict(block_size=8, block_counts=3, window_size=10, return_block_indices=True)
    packed, packed_indices = nsa_attention(q, k, v, **gates, cu_seqlens=cu_seqlens, **options)
    for start, end in ((0, 37), (37, 80)):
        alone, indices = nsa_attention(q[:, start:end], k[:, start:end], v[:, start:end],
                                       **{n: t[:, start:end] for n, t in gates.items()}, **options)
        torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(packed_indices[:, start:end], indices)


def test_given_block_indices_any_order(device, make_inputs, check_nsa):
    """Given indices in any order with -1 anywhere mean the same set; returned ascending."""
    q, k, v, gates = make_inputs(1, 64, 2, 1, 16, torch.float32, device, branches=("slc",))
    t = torch.arange(64, device=device)
    own = (t // 16)[None, :, None]
    later = torch.where(own > 0, own, -1)
    chosen = torch.stack([torch.full_like(own, -1), later, torch.zeros_like(own)], dim=-1)  # [-1, own, 0]
    o, indices = nsa_attention(q, k, v, **gates, block_size=16, block_indices=chosen.int(), return_block_indices=True)
    assert indices.dtype == torch.int32
    expected = torch.stack([torch.zeros_like(own), later, torch.full_like(own, -1)], dim=-1)
    assert torch.equal(indices, expected.int())
    check_nsa(q, k, v, gates, block_size=16, block_indices=indices)


def test_chunked_selected_attention_matches_naive(device):
    """The gathered (chunked) selected branch alone, chunks smaller than the sequence."""
    import gatedfwa.ops.nsa.torch_path as chunked

    q = torch.randn(45, 4, 16, device=device, dtype=torch.float64)
    k = torch.randn(45, 2, 16, device=device, dtype=torch.float64)
    v = torch.randn(45, 2, 16, device=device, dtype=torch.float64)
    t = torch.arange(45, device=device)
    indices = torch.stack([t // 8, (t // 8 - 2).clamp(min=-1)], dim=-1)[:, None, :].expand(45, 2, 2)
    indices = torch.where(indices[..., 1:] == indices[..., :1], -1, indices[..., 1:]).expand(45, 2, 1)
    indices = torch.cat([(t // 8)[:, None, None].expand(45, 2, 1), indices], dim=-1)
    old = chunked.GATHER_ELEMENTS
    chunked.GATHER_ELEMENTS = 2 * 16 * 16 * 7  # 7 queries per chunk
    try:
        fast = chunked_selected_attention(q, k, v, indices, 8, 0.3)
    finally:
        chunked.GATHER_ELEMENTS = old
    reference, _ = naive_selected_attention(q, k, v, indices, 8, 0.3)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)


def test_selected_branch_saves_no_gathered_keys(monkeypatch):
    """The selected branch keeps only its inputs for the backward (checkpointed chunks), not
    the gathered keys, values and probabilities of every query, and its gradients still
    match the uncheckpointed computation. Indices come in the strided layout the selection
    returns them in."""
    from gatedfwa.ops.nsa import torch_path as chunked

    monkeypatch.setattr(chunked, "GATHER_ELEMENTS", 1 << 14)  # several chunks at this size
    n, heads, dim, block, count = 256, 2, 16, 16, 4
    q, k, v = (torch.randn(n, heads, dim, requires_grad=True) for _ in range(3))
    indices = torch.stack([torch.randperm(n // block)[:count].sort().values for _ in range(n * heads)])
    indices = indices.view(n, heads, count).permute(1, 0, 2).contiguous().permute(1, 0, 2).to(torch.int32)
    indices = torch.minimum(indices, (torch.arange(n) // block)[:, None, None])  # at or before the own block
    saved = {}  # storage -> elements: every chunk saves the same k and v, counted once

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = chunked_selected_attention(q, k, v, indices, block, 0.25)
    gathered = n * heads * count * block * dim  # the keys of every query, once
    assert sum(saved.values()) < gathered / 4
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    args = (q, k, v, indices, 0, block, 0.25)
    expected = torch.autograd.grad(chunked._selected_chunk(*args), (q, k, v), do)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
