"""The chunk-local gate sums the attention kernels read (gatedfwa/ops/window_attention/chunk_sums.py),
Triton kernel (interpreter on CPU) against the float64 definition (naive.py)."""

import pytest
import torch
import torch.nn.functional as F

from gatedfwa.ops.common.triton_support import LOG2E
from gatedfwa.ops.gate import gate_spec
from gatedfwa.ops.gate.torch_path import torch_log_gates
from gatedfwa.ops.window_attention import launch
from gatedfwa.ops.window_attention.chunk_sums import chunk_gate_sums, chunk_gate_sums_from_projection
from gatedfwa.ops.window_attention.naive import naive_chunk_gate_sums


def chunk_sums_programs(chunks: int, max_block_h: int = 64):
    """Within the block, each chunk sums program takes `chunks` chunks and up to
    `max_block_h` heads."""
    return launch.TUNING.overridden(rules={
        "chunk_sums": lambda arch, block_d, gate: dict(CHUNKS=chunks, MAX_BLOCK_H=max_block_h, num_warps=4)})


def relative_error(fast, ref):
    """Max |fast - ref| / (|ref| + 1e-6): every sum is of same-signed terms, so float32
    accuracy is relative to the sum itself."""
    return ((fast.double() - ref).abs() / (ref.abs() + 1e-6)).max().item()


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sums_from_gates(chunk, dtype, device):
    # Programs of 4 chunks: 37 tokens end inside a program's second (chunk 16) or last
    # (chunk 4: 10 chunks, blocks of 4) chunk.
    with chunk_sums_programs(4):
        g = F.logsigmoid(torch.randn(2, 37, 5, device=device) * 3).to(dtype)
        sums = chunk_gate_sums(g, chunk)
        assert sums.shape == (2, 2, 5, 37) and sums.dtype == torch.float32
        assert relative_error(sums, naive_chunk_gate_sums(g, chunk)) < 1e-5


@pytest.mark.parametrize("chunks_per_program", [1, 4])
def test_sums_respect_sequence_boundaries(chunks_per_program, device):
    """Packed sequences, an empty and a one-token one; several head blocks; one chunk per
    program, and several (blocks cut at each sequence's end)."""
    with chunk_sums_programs(chunks_per_program, max_block_h=2):
        cu_seqlens = torch.tensor([0, 5, 5, 6, 30, 37], dtype=torch.int32, device=device)
        g = F.logsigmoid(torch.randn(1, 37, 5, device=device) * 3)
        sums = chunk_gate_sums(g, 8, cu_seqlens)
        ref = naive_chunk_gate_sums(g, 8, cu_seqlens)
        assert relative_error(sums, ref) < 1e-5
        # A chunk never reaches into the next sequence: position 4 ends sequence 0, so its
        # suffix is empty, and the one-token sequence's prefix is its own gate (in base 2).
        assert torch.all(sums[1, 0, :, 4] == 0)
        torch.testing.assert_close(sums[0, 0, :, 5], g[0, 5].float() * LOG2E)


@pytest.mark.parametrize("with_bias", [True, False])
def test_sums_from_projection(with_bias, device):
    """From gate_pre, including the extremes (a up to 1e4, beta_pre from -50 to 50): finite,
    and equal to the sums of the float64 formula."""
    heads = 3
    a = torch.cat([torch.randn(1, 40, heads, device=device) * 3,
                   torch.tensor([1e4, -1e4, 0.5], device=device).expand(1, 8, heads)], dim=1)
    beta_pre = torch.cat([torch.randn(1, 40, heads, device=device) * 3,
                          torch.linspace(-50, 50, 8 * heads, device=device).view(1, 8, heads)], dim=1)
    bias = torch.randn(heads, device=device) if with_bias else None
    gate_pre = torch.cat([a, beta_pre], dim=-1)
    sums = chunk_gate_sums_from_projection(gate_pre, bias, 16)
    a64 = a.double() + (0 if bias is None else bias.double())
    ref = naive_chunk_gate_sums(torch_log_gates(gate_spec("sharpened"), a64, beta_pre.double()), 16)
    assert torch.isfinite(sums).all()
    assert relative_error(sums, ref) < 1e-5


@pytest.mark.parametrize("chunks_per_program", [1, 2])
def test_one_gate_dominates(chunks_per_program, device):
    """A gate of -1e4 among gates of ~-1e-3: P and S next to it are direct sums, so each keeps
    its own small terms to float32's relative accuracy (a difference of longer sums such as
    total - prefix, or R[t] - g[t], would round them away against 1e4)."""
    with chunk_sums_programs(chunks_per_program):
        g = -torch.rand(2, 48, 3, device=device) * 1e-3
        g[:, 7] = -1e4
        g[1, 40, 1] = -3e4
        sums = chunk_gate_sums(g, 16)
        ref = naive_chunk_gate_sums(g, 16)
        assert relative_error(sums, ref) < 1e-5
        # S before the big gate is dominated by it; S after it holds only small gates.
        assert (sums[1, :, :, 8:15].abs() < 1).all() and (sums[1, :, :, 8:15] < 0).all()


def test_empty(device):
    assert chunk_gate_sums(torch.zeros(2, 0, 3, device=device), 16).shape == (2, 2, 3, 0)
