"""Backends and tolerances shared by the gate tests (the default gate in depth, and every
registered gate)."""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.gate import launch


def _nan_filled(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def small_programs(monkeypatch):
    """Gate kernels launched with programs of 64 elements (every test spans several programs
    and a ragged last one), their output buffers filled with NaN first."""
    monkeypatch.setattr(launch, "allocate", _nan_filled)
    with launch.TUNING.overridden(rules={"elementwise": lambda arch: dict(ELEMENTS=64, num_warps=4)}):
        yield


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Force a backend; for Triton, small programs and NaN-filled output buffers."""
    if request.param == "triton":
        request.getfixturevalue("small_programs")
    with use_backend(request.param):
        yield request.param


@pytest.fixture
def output_rtol():
    """output_rtol(dtype): the elementwise tolerance of a gate result, ~170 float32 ulps for
    float32 results (the rounding of z = beta a is amplified ~|z| times in exp(-|z|)), two
    roundings for bf16/fp16 results."""
    return lambda dtype: 2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
