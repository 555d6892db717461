"""Inputs and checks shared by the NSA tests (fixtures make_inputs and check_nsa): the float64
rule (docs: gatedfwa/testing.py) on the output and every gradient, and the selection compared
block for block with the float64 reference where the reference's choice is not a near-tie."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatedfwa.ops.nsa import nsa_attention
from gatedfwa.ops.nsa.naive import naive_nsa_attention
from gatedfwa.ops.nsa.rules import compressed_attention, mean_pool_blocks
from gatedfwa.ops.common.varlen import query_key_spans
from gatedfwa.testing import assert_within_rule, float32_slack

GATE_NAMES = ("g", "g_cmp", "g_slc", "g_swa")

# Importance gaps below this (per unit of group size) may flip in the precision's rounding.
NEAR_TIE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype, device, branches=("cmp", "slc", "swa"),
                gate=True, block_size=16):
    """q, k, v in dtype; gates float32: g log gates, branch gates sigmoids (None if absent).
    The keys of each block share a random direction, so that block summaries differ clearly
    (means of independent keys would all be near 0) and selections are seldom near-ties."""
    q = torch.randn(batch, seqlen, q_heads, head_dim, device=device).to(dtype)
    num_blocks = -(-seqlen // block_size)
    shared = torch.randn(batch, num_blocks, kv_heads, head_dim, device=device).repeat_interleave(block_size, dim=1)
    k = (torch.randn(batch, seqlen, kv_heads, head_dim, device=device) + 2 * shared[:, :seqlen]).to(dtype)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=device).to(dtype)
    shape = (batch, seqlen, q_heads)
    gates = {
        "g": F.logsigmoid(torch.randn(shape, device=device) * 2 + 1) if gate and "swa" in branches else None,
        "g_cmp": torch.sigmoid(torch.randn(shape, device=device)) if "cmp" in branches else None,
        "g_slc": torch.sigmoid(torch.randn(shape, device=device)) if "slc" in branches else None,
        "g_swa": torch.sigmoid(torch.randn(shape, device=device)) if "swa" in branches else None,
    }
    return q, k, v, gates


def selection_gaps(q, k, block_size, block_counts, cu_seqlens=None, cu_seqlens_q=None) -> torch.Tensor:
    """[B, T_q, H] float64: per query and kv head, the gap between the importance of the last
    block the float64 reference selects and the best one it leaves out (inf where nothing
    is left out, or where the always-kept blocks fill every slot: their order is exact).
    cu_seqlens: k's offsets (and q's unless cu_seqlens_q is given)."""
    q64, k64 = q.double(), k.double()
    batch, seqlen, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    gaps = torch.full((batch, seqlen, num_kv_heads), float("inf"), dtype=torch.float64, device=q.device)
    for b, (start, end), (k_start, k_end) in query_key_spans(cu_seqlens_q, cu_seqlens, batch, seqlen, k.shape[1]):
        ks = k64[b, k_start:k_end]
        first_query = (k_end - k_start) - (end - start)
        summaries = mean_pool_blocks(ks, block_size)
        _, _, probs = compressed_attention(q64[b, start:end], summaries, summaries, block_size,
                                           head_dim**-0.5, first_query)
        importance = probs.unflatten(0, (num_kv_heads, group)).sum(dim=1)  # [H, n, nc]
        n, nc = end - start, summaries.shape[0]
        t = torch.arange(first_query, first_query + n, device=q.device)[:, None]
        c = torch.arange(nc, device=q.device)[None, :]
        candidate = (c + 1) * block_size <= t + 1
        kept = (c == 0) | (c == t // block_size)
        scores = importance.masked_fill(~candidate | kept, float("-inf"))
        # The always-kept blocks take their slots first.
        slots = block_counts - (1 + (t[:, 0] >= block_size).long())  # [n]
        ordered = torch.sort(scores, dim=-1, descending=True).values  # [H, n, nc]
        padded = torch.cat([ordered, ordered.new_full((*ordered.shape[:2], block_counts + 1), float("-inf"))], dim=-1)
        index = slots.clamp(min=0)[None, :, None].expand(num_kv_heads, n, 1)
        last_in = torch.gather(padded, -1, (index - 1).clamp(min=0)).squeeze(-1)
        first_out = torch.gather(padded, -1, index).squeeze(-1)
        gap = torch.where((slots[None] > 0) & torch.isfinite(first_out), last_in - first_out, float("inf"))
        gaps[b, start:end] = gap.transpose(0, 1)
    return gaps


def run_with_grads(fn, q, k, v, gates, do, **kwargs):
    """(o, gradients of every differentiable input, extra) with fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    gate_leaves = {name: (None if t is None else t.detach().clone().requires_grad_()) for name, t in gates.items()}
    o, extra = fn(*leaves, **gate_leaves, **kwargs)
    inputs = leaves + [t for t in gate_leaves.values() if t is not None]
    names = ["dq", "dk", "dv"] + ["d" + n for n, t in gate_leaves.items() if t is not None]
    grads = torch.autograd.grad(o, inputs, do)
    return o.detach(), dict(zip(names, grads)), extra


def fast_op(*args, **kwargs):
    return nsa_attention(*args, return_block_indices=True, **kwargs)


def _check_nsa(q, k, v, gates, block_size=16, block_counts=3, window_size=20, cu_seqlens=None, block_indices=None,
              min_checked=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """Run nsa_attention (whichever backend the environment selects), check its selection
    against the float64 reference where that is not a near-tie (at least min_checked of the
    rows), then the rule on o and every gradient, the references run with the selection
    the fast path used. q may be shorter than k (cu_seqlens_q and cu_seqlens_k for packed
    sequences). Returns (o, grads, block indices)."""
    options = dict(block_size=block_size, block_counts=block_counts, window_size=window_size, cu_seqlens=cu_seqlens,
                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    do = torch.randn_like(q)
    o, grads, indices = run_with_grads(fast_op, q, k, v, gates, do, block_indices=block_indices, **options)
    if gates["g_slc"] is not None and block_indices is None:
        _, reference_indices = naive_nsa_attention(q.double(), k.double(), v.double(), g_slc=gates["g_slc"].double(),
                                                   block_size=block_size, block_counts=block_counts,
                                                   cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                                                   cu_seqlens_k=cu_seqlens_k)
        group = q.shape[2] // k.shape[2]
        k_offsets = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        gaps = selection_gaps(q, k, block_size, block_counts, k_offsets, cu_seqlens_q)
        clear = gaps > NEAR_TIE[q.dtype] * group
        if min_checked is None:
            min_checked = 0.95 if q.dtype == torch.float32 else 0.75
        assert clear.float().mean().item() >= min_checked, "too many near-ties in the test inputs"
        mismatch = (indices != reference_indices).any(dim=-1) & clear
        assert not mismatch.any(), f"selection differs from the reference at {mismatch.nonzero()[:5].tolist()}"
    given = {**options, "block_indices": indices if gates["g_slc"] is not None else None}
    low = run_with_grads(naive_nsa_attention, q, k, v, gates, do, **given)
    as64 = {n: (None if t is None else t.double()) for n, t in gates.items()}
    ref = run_with_grads(naive_nsa_attention, q.double(), k.double(), v.double(), as64, do.double(), **given)
    assert_within_rule("o", o, low[0], ref[0], atol=float32_slack(ref[0], q.dtype))
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert_within_rule(name, grad, low[1][name], ref[1][name], atol=float32_slack(ref[1][name], q.dtype))
    return o, grads, indices


@pytest.fixture
def make_inputs():
    """make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype, device, branches=("cmp",
    "slc", "swa"), gate=True, block_size=16) -> (q, k, v, gates): q, k, v in dtype with keys
    that make block selections clear, and the gates g, g_cmp, g_slc, g_swa by name (float32,
    None for a branch left out)."""
    return _make_inputs


@pytest.fixture
def check_nsa():
    """check_nsa(q, k, v, gates, block_size=16, block_counts=3, window_size=20, cu_seqlens=None,
    block_indices=None, min_checked=None, cu_seqlens_q=None, cu_seqlens_k=None) -> (o, grads,
    block indices): nsa_attention on the selected backend, its selection and the rule on o and
    every gradient checked against the float64 reference."""
    return _check_nsa
