"""Test session setup.

Tests run on the CPU by default, Triton kernels through its interpreter, which must be
switched on before triton is imported. GATEDFWA_TEST_DEVICE=cuda runs the same tests on a GPU.
"""

import os

if os.environ.get("GATEDFWA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = os.environ.get("GATEDFWA_TEST_DEVICE", "cpu")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Different inputs for every test (and parameter set), reproducible from its id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
