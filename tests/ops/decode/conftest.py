"""Inputs shared by the decode tests (the host-position op, the static step, chunked prefill)."""

from __future__ import annotations

import pytest
import torch


def _make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype, gated, gate_scale=1.0, device="cpu"):
    q = torch.randn(batch, seqlen, q_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, dtype=dtype, device=device)
    g = -torch.rand(batch, seqlen, q_heads, device=device) * gate_scale if gated else None
    return q, k, v, g


@pytest.fixture
def make_inputs():
    """make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype, gated, gate_scale=1.0,
    device="cpu") -> (q, k, v, g): a random stream q [B, T, HQ, D], k, v [B, T, H, D] and, when
    gated, log gates g [B, T, HQ] float32 uniform in [-gate_scale, 0] (else None)."""
    return _make_inputs


class RecordingLaunches:
    """Stands in for a Triton kernel and records the grid of each launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]

    @property
    def most_splits(self) -> int:
        """The largest split count (grid dimension 1) of the launches so far."""
        return max((grid[1] for grid in self.grids), default=0)


@pytest.fixture
def decode_launches(monkeypatch):
    """Records the decode kernel's launches of the test (a RecordingLaunches)."""
    from gatedfwa.ops.decode import kernels

    recorder = RecordingLaunches(kernels._decode_kernel)
    monkeypatch.setattr(kernels, "_decode_kernel", recorder)
    return recorder


@pytest.fixture
def force_splits(monkeypatch):
    """force_splits(num_splits, block_n=16): every decode kernel launch of the test, also those
    of the ops, splits its slots into num_splits (at most: a split holds at least one tile of
    block_n slots), through the kernel's config overrides."""
    from gatedfwa.ops.decode import kernels

    default_config = kernels.decode_config

    def force(num_splits: int, block_n: int = 16) -> None:
        def config(*args, **kwargs):
            return {**default_config(*args, **kwargs), "num_splits": num_splits, "block_n": block_n}

        monkeypatch.setattr(kernels, "decode_config", config)

    return force
