"""The warp-specialised Gluon forward kernel for Hopper (gatedfwa/ops/window_attention/gluon_forward.py).

On the CPU: every variant (D 64/128, gated or not, fp16/bf16, GQA) compiles for sm_90 to a
cubin (Triton ships ptxas), so that a syntax, type or layout error fails here; and the dispatch
takes the kernel only where it was asked for and supports the call. On a Hopper GPU: o and lse
(and the Triton backward's gradients from them) against the float64 oracle, with the rule of
docs/correctness.md, over ragged lengths, window 1, windows past T, extreme gates and GQA.
"""

from __future__ import annotations

import os

import pytest
import torch

from gatedfwa.environment import HOPPER_KERNELS
from gatedfwa.errors import ConfigError
from gatedfwa.ops.window_attention import forward, launch

gluon_forward = pytest.importorskip(
    "gatedfwa.ops.window_attention.gluon_forward", reason="this Triton has no triton.experimental.gluon Hopper support",
    exc_type=ImportError)


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception:  # noqa: BLE001 - any failure to locate it means: cannot compile here
        return False
    return bool(path) and os.path.exists(path)


def _hopper_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's ptxas to compile for sm_90")
@pytest.mark.parametrize("head_dim", gluon_forward.HEAD_DIMS)
@pytest.mark.parametrize("has_gate", [False, True])
def test_compiles_for_hopper(head_dim, has_gate):
    compiled = gluon_forward.compile_for_hopper(head_dim, has_gate)
    cubin = compiled.asm["cubin"]
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000
    ptx = compiled.asm["ptx"]
    # Warp-specialised as designed: TMA copies into the ring, wgmma for both matmuls, and the
    # producer's registers handed to the consumers.
    assert "cp.async.bulk.tensor.3d" in ptx and "wgmma.mma_async" in ptx
    assert "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx
    assert ("cp.async.bulk.tensor.1d" in ptx) == has_gate  # the gate sums ride with the K/V tiles


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton's ptxas to compile for sm_90")
def test_compiles_fp16_gqa_with_chunks_smaller_than_tiles():
    """GQA (4 query heads per key head), float16, and a gate chunk of 16 (four chunks per key
    tile, the carries of gluon_forward._tile_gate_terms)."""
    compiled = gluon_forward.compile_for_hopper(64, True, torch.float16, group=4, gate_chunk=16)
    assert compiled.asm["cubin"][:4] == b"\x7fELF"


def test_switch_defaults_to_triton(monkeypatch, make_inputs, device):
    monkeypatch.delenv(HOPPER_KERNELS.name, raising=False)
    q, k, v, _ = make_inputs(1, 8, 1, 1, 64, False, torch.bfloat16, device)
    assert not forward._gluon_serves(q, k, v, None, None, None)


def test_bad_switch_value_names_the_variable(monkeypatch, make_inputs, device):
    monkeypatch.setenv(HOPPER_KERNELS.name, "cuda")
    q, k, v, _ = make_inputs(1, 8, 1, 1, 64, False, torch.bfloat16, device)
    with pytest.raises(ConfigError, match="GATEDFWA_HOPPER_KERNELS='cuda'"):
        forward._gluon_serves(q, k, v, None, None, None)


@pytest.mark.skipif(_hopper_gpu(), reason="checks the refusals off Hopper GPUs")
def test_unsupported_calls_are_refused_off_hopper(monkeypatch, make_inputs):
    """Asked for, the kernel still serves nothing off a Hopper GPU (nor under the interpreter),
    and the op gives the Triton kernel's answer."""
    monkeypatch.setenv(HOPPER_KERNELS.name, "gluon")
    q, k, v, _ = make_inputs(1, 8, 1, 1, 64, False, torch.bfloat16, "cpu")
    assert gluon_forward.unsupported_reason(q, k, v, None, None, None, 64) == "not on an NVIDIA GPU"
    assert not forward._gluon_serves(q, k, v, None, None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_gpu(), reason="needs a Hopper GPU (compute capability 9)")
def test_supported_calls(make_inputs):
    q, k, v, g = make_inputs(2, 100, 4, 2, 128, True, torch.bfloat16, "cuda")
    sums = torch.zeros(2, 2, 4, 100, device="cuda")
    chunk = launch.gate_chunk(128, torch.device("cuda"))
    assert gluon_forward.supports(q, k, v, sums, None, None, chunk)
    assert gluon_forward.supports(q, k, v, None, None, None, chunk)
    offsets = torch.tensor([0, 100], dtype=torch.int32, device="cuda")
    assert "packed" in gluon_forward.unsupported_reason(q[:1], k[:1], v[:1], None, offsets, None, chunk)
    assert "fewer queries" in gluon_forward.unsupported_reason(q[:, :50], k, v, None, None, None, chunk)
    assert "head size" in gluon_forward.unsupported_reason(q[..., :80], k[..., :80], v[..., :80], None, None, None,
                                                           chunk)
    assert "dtype" in gluon_forward.unsupported_reason(q.float(), k.float(), v.float(), None, None, None, chunk)


def _extreme_gates(shape, gate_value):
    """Mostly extreme gates (between gate_value and half of it), every 5th one ordinary."""
    g = gate_value * (0.5 + 0.5 * torch.rand(*shape, device="cuda"))
    g[:, ::5] = -0.1
    return g


@pytest.fixture
def gluon_kernel(monkeypatch, triton_backend):
    """The op on the Triton backend with GATEDFWA_HOPPER_KERNELS=gluon; returns the list of the
    Gluon launches made (head sizes), to show that the kernel ran."""
    monkeypatch.setenv(HOPPER_KERNELS.name, "gluon")
    launches = []
    original = gluon_forward.gluon_attention_forward

    def recording(q, *args, **kwargs):
        launches.append(q.shape[-1])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(gluon_forward, "gluon_attention_forward", recording)
    return launches


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_gpu(), reason="needs a Hopper GPU (compute capability 9)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("batch,seqlen,q_heads,kv_heads,window", [
    (2, 1000, 4, 4, 300),    # many tiles, masked and unmasked; T not a multiple of 128
    (1, 77, 2, 1, 1),        # window 1: every query sees only itself; GQA 2:1
    (2, 300, 8, 2, None),    # full causal (window >= T), GQA 4:1
    (1, 193, 3, 3, 500),     # window past T, a last block with rows for one consumer only
    (1, 64, 2, 2, 65),       # one block, no rows for the second consumer
    (3, 515, 4, 1, 129),     # MQA, windows crossing tile edges
])
def test_matches_reference(gluon_kernel, dtype, head_dim, gate, batch, seqlen, q_heads, kv_heads, window, make_inputs,
                           check_against_reference, triton_op):
    q, k, v, g = make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, gate, dtype, "cuda")
    check_against_reference(triton_op, q, k, v, g, window)
    assert gluon_kernel == [head_dim]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_gpu(), reason="needs a Hopper GPU (compute capability 9)")
@pytest.mark.parametrize("gate_value", [-1e4, -30.0, -1e-6])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_extreme_gates(gluon_kernel, gate_value, head_dim, make_inputs, check_against_reference, triton_op):
    q, k, v, _ = make_inputs(2, 400, 2, 2, head_dim, False, torch.bfloat16, "cuda")
    g = _extreme_gates((2, 400, 2), gate_value)
    fast = check_against_reference(triton_op, q, k, v, g, 200)
    for t in (fast[0], fast[1], *fast[2]):
        assert torch.isfinite(t).all()
    assert gluon_kernel == [head_dim]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_gpu(), reason="needs a Hopper GPU (compute capability 9)")
def test_matches_triton_kernel_and_routes_the_rest(gluon_kernel, monkeypatch, make_inputs, triton_op):
    """Gluon's o and lse agree with the Triton kernel's to bf16 rounding, and calls the kernel
    does not take (packed sequences, D = 80) run on Triton."""
    q, k, v, g = make_inputs(2, 700, 4, 2, 128, True, torch.bfloat16, "cuda")
    o_gluon, lse_gluon = triton_op(q, k, v, g, 256, None)
    assert gluon_kernel == [128]
    monkeypatch.setenv(HOPPER_KERNELS.name, "triton")
    o_triton, lse_triton = triton_op(q, k, v, g, 256, None)
    torch.testing.assert_close(o_gluon, o_triton, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_gluon, lse_triton, atol=1e-3, rtol=1e-4)
    monkeypatch.setenv(HOPPER_KERNELS.name, "gluon")
    offsets = torch.tensor([0, 300, 700], dtype=torch.int32, device="cuda")
    triton_op(q[:1], k[:1], v[:1], g[:1], 256, offsets)
    q80, k80, v80, g80 = make_inputs(1, 100, 2, 2, 80, True, torch.bfloat16, "cuda")
    triton_op(q80, k80, v80, g80, 50, None)
    assert gluon_kernel == [128]
