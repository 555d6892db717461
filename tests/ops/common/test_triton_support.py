"""The interpreter corrections of gatedfwa/ops/common/triton_support.py, applied on import whenever
Triton's interpreter is on: interpreted kernels must give the compiled kernels' answers."""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.common import triton_support

triton = pytest.importorskip("triton")
tl = triton.language

pytestmark = pytest.mark.skipif(not triton_support.interpreting(), reason="checks Triton's CPU interpreter")


@triton.jit
def _masked_copy(src, dst, n, LIVE_FROM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    live = n > LIVE_FROM  # a scalar comparison combined with a block mask
    tl.store(dst + offs, tl.load(src + offs, mask=(offs < n) & live, other=-1.0))


@triton.jit
def _bf16_dot(a, b, c, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(a + offs[:, None] * BLOCK + offs[None, :])
    y = tl.load(b + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c + offs[:, None] * BLOCK + offs[None, :], tl.dot(x, y).to(tl.bfloat16))


@pytest.mark.parametrize("n,live_from", [(5, 3), (5, 7)])
def test_scalar_comparison_masks(n, live_from):
    src = torch.randn(16)
    dst = torch.empty(16)
    _masked_copy[(1,)](src, dst, n, LIVE_FROM=live_from, BLOCK=16)
    expected = torch.full((16,), -1.0)
    if n > live_from:
        expected[:n] = src[:n]
    torch.testing.assert_close(dst, expected, rtol=0, atol=0)


def test_bfloat16_dot_and_rounding():
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16, dtype=torch.bfloat16)
    _bf16_dot[(1,)](a, b, c, BLOCK=16)
    # float32 accumulation, then one round-to-nearest-even to bf16, as on the GPU.
    torch.testing.assert_close(c, (a.float() @ b.float()).bfloat16(), rtol=0, atol=0)
