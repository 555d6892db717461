"""nsa_attention rejects bad input with an error naming the argument."""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.nsa import nsa_attention


def inputs(device, seqlen=32):
    q = torch.randn(1, seqlen, 4, 16, device=device)
    k = torch.randn(1, seqlen, 2, 16, device=device)
    v = torch.randn(1, seqlen, 2, 16, device=device)
    gate = torch.rand(1, seqlen, 4, device=device)
    return q, k, v, gate


def test_needs_a_branch(device):
    q, k, v, _ = inputs(device)
    with pytest.raises(ValueError, match="at least one of the branch gates"):
        nsa_attention(q, k, v)


def test_log_gates_need_the_sliding_branch(device):
    q, k, v, gate = inputs(device)
    with pytest.raises(ValueError, match="g_swa"):
        nsa_attention(q, k, v, g=-gate, g_cmp=gate)


@pytest.mark.parametrize("name", ["g", "g_cmp", "g_slc", "g_swa"])
def test_gate_shape(device, name):
    q, k, v, gate = inputs(device)
    gates = {"g_swa": gate, name: gate[:, :, :2]}
    with pytest.raises(ValueError, match=f"{name} must have shape"):
        nsa_attention(q, k, v, **gates)


@pytest.mark.parametrize("argument, value, error, match", [
    ("block_size", 0, ValueError, "block_size must be >= 1"),
    ("block_size", 16.0, TypeError, "block_size must be an int"),
    ("block_counts", 0, ValueError, "block_counts must be >= 1"),
    ("window_size", -1, ValueError, r"window_size must be >= 1 \(it counts the query itself\), 0 \(no sliding branch\)"),
    ("scale", float("nan"), ValueError, "scale must be a finite number"),
])
def test_bad_numbers(device, argument, value, error, match):
    q, k, v, gate = inputs(device)
    with pytest.raises(error, match=match):
        nsa_attention(q, k, v, g_slc=gate, g_swa=gate, **{argument: value})


def test_per_query_block_counts_unsupported(device):
    q, k, v, gate = inputs(device)
    with pytest.raises(TypeError, match="block_counts must be an int"):
        nsa_attention(q, k, v, g_slc=gate, block_counts=torch.full((1, 32, 2), 2, device=device))


def test_window_zero_with_sliding_gate(device):
    q, k, v, gate = inputs(device)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        nsa_attention(q, k, v, g_swa=gate, window_size=0)


def test_gqa_mismatch(device):
    q, k, v, gate = inputs(device)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        nsa_attention(q[:, :, :3], k, v, g_cmp=gate[:, :, :3])


def test_cu_seqlens_needs_batch_one(device):
    q, k, v, gate = inputs(device)
    two = [torch.cat([x, x]) for x in (q, k, v, gate)]
    with pytest.raises(ValueError, match="batch size must be 1"):
        nsa_attention(*two[:3], g_cmp=two[3], cu_seqlens=torch.tensor([0, 32], dtype=torch.int32, device=device))


@pytest.mark.parametrize("entries, match", [
    ([0, 5], "after the query's own block"),
    ([0, 0], "same block twice"),
    ([-2, 0], "must be -1"),
])
def test_bad_block_indices(device, entries, match):
    q, k, v, gate = inputs(device, seqlen=64)
    indices = torch.tensor(entries, dtype=torch.int32, device=device).expand(1, 64, 2, 2)
    with pytest.raises(ValueError, match=match):
        nsa_attention(q, k, v, g_slc=gate, block_size=16, block_indices=indices)


def test_block_indices_layout(device):
    q, k, v, gate = inputs(device)
    with pytest.raises(ValueError, match="block_indices must have shape"):
        nsa_attention(q, k, v, g_slc=gate, block_indices=torch.zeros(1, 32, 4, 2, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="int32 or int64"):
        nsa_attention(q, k, v, g_slc=gate, block_indices=torch.zeros(1, 32, 2, 2, device=device))
    with pytest.raises(ValueError, match="only the selected branch"):
        nsa_attention(q, k, v, g_cmp=gate, block_indices=torch.zeros(1, 32, 2, 2, dtype=torch.int32, device=device))
