"""The Hopper variant of the window attention kernels (launch.py: USE_TMA)
against the float64 naive reference, with the rule of docs/correctness.md, and the measured
launch table's precedence (tuned.py; the sweep that writes it is tested in
tests/benchmarks/test_sweep_attention.py).

On the CPU the interpreter runs the descriptor loads (tensor descriptors, zero-filled outside
the sequence) with the interpreter's tile sizes; the GPU test runs them compiled at the real
tile sizes.
"""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.window_attention import launch

VARIANTS = {"tma": dict(USE_TMA=True)}


ATTENTION_KERNELS = ("forward", "dq", "dkdv")


@pytest.fixture
def with_variant(monkeypatch, override_tuning):
    """with_variant(flags): flags added to every attention kernel's configuration until the
    test ends; returns the list of configurations the launchers end up using (after
    usable_config), to show which path ran."""
    return lambda flags: _with_variant(monkeypatch, override_tuning, flags)


def _with_variant(monkeypatch, override_tuning, flags: dict) -> list[dict]:
    base = launch.TUNING.rules
    rules = {kernel: (lambda rule: lambda *args, **keys: {**rule(*args, **keys), **flags})(base[kernel])
             for kernel in ATTENTION_KERNELS}
    override_tuning(launch.TUNING, rules=rules)
    used = []
    usable = launch.usable_config

    def recording(config, *tensors, **options):
        result = usable(config, *tensors, **options)
        used.append(result)
        return result

    monkeypatch.setattr(launch, "usable_config", recording)
    return used


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("window,gate", [(7, True), (None, True), (20, False)])
def test_variants_varlen_gqa(triton_backend, device, with_variant, variant, window, gate, make_inputs,
                             check_against_reference, triton_op):
    """Packed sequences (empty, length 1, straddling tiles) and GQA 2:1: the descriptors are
    per sequence, so tiles reaching before its start or past its end must read zeros."""
    used = with_variant(VARIANTS[variant])
    cu_seqlens = torch.tensor([0, 0, 1, 18, 51, 90], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, 90, 4, 2, 32, gate, torch.bfloat16, device)
    check_against_reference(triton_op, q, k, v, g, window, cu_seqlens)
    assert len(used) == 3 and all(config["USE_TMA"] for config in used)


def test_tma_batched_fp32(triton_backend, device, with_variant, make_inputs, check_against_reference, triton_op):
    used = with_variant(VARIANTS["tma"])
    q, k, v, g = make_inputs(2, 45, 2, 1, 16, True, torch.float32, device)
    check_against_reference(triton_op, q, k, v, g, 19)
    assert all(config["USE_TMA"] for config in used)


def test_tma_falls_back_where_unaligned(triton_backend, device, with_variant, make_inputs, check_against_reference,
                                        triton_op):
    """D = 20 in bf16 with one head: a token stride of 40 bytes, which TMA cannot address;
    the launchers drop USE_TMA and the pointer loads give the right answer."""
    used = with_variant(VARIANTS["tma"])
    q, k, v, g = make_inputs(1, 40, 1, 1, 20, True, torch.bfloat16, device)
    assert not launch.descriptors_usable(q, k, v)
    check_against_reference(triton_op, q, k, v, g, 9)
    assert used and not any(config["USE_TMA"] for config in used)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: descriptors compiled at real tile sizes")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head_dim,q_heads,kv_heads,window", [(128, 4, 4, 300), (64, 8, 1, 1000), (128, 4, 2, None)])
def test_variants_gpu(triton_backend, with_variant, variant, head_dim, q_heads, kv_heads, window, make_inputs,
                      check_against_reference, triton_op):
    """Sequences of many tiles, batched and packed, with launch.py's tile sizes plus the
    variant's switches (on a GPU without TMA the launchers fall back, and the test still
    checks the answer)."""
    with_variant(VARIANTS[variant])
    q, k, v, g = make_inputs(2, 1500, q_heads, kv_heads, head_dim, True, torch.bfloat16, "cuda")
    check_against_reference(triton_op, q, k, v, g, window)
    cu_seqlens = torch.tensor([0, 1, 700, 700, 1500], dtype=torch.int32, device="cuda")
    check_against_reference(triton_op, q[:1], k[:1], v[:1], g[:1], window, cu_seqlens)


def test_descriptors_usable_checks_alignment(device):
    # On the test device: compiled (not interpreted) kernels take descriptors only from GPU memory.
    aligned = torch.zeros(16, 4, 64, dtype=torch.bfloat16, device=device)
    shifted = torch.zeros(16 * 4 * 64 + 1, dtype=torch.bfloat16, device=device)[1:].view(16, 4, 64)  # 2 bytes off
    assert launch.descriptors_usable(aligned)
    assert not launch.descriptors_usable(shifted)
    assert not launch.descriptors_usable(aligned, shifted)
    assert not launch.descriptors_usable(aligned[..., 1:63].reshape(16, 4, 62))  # 124-byte token stride
    assert not launch.descriptors_usable(aligned.transpose(-1, -2)[:, :4])  # D not contiguous


def test_measured_entries_take_precedence(override_tuning):
    """A measured entry (tuned.py) replaces launch.py's rule for its kernel, architecture,
    BLOCK_D and gate only."""
    entry = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, USE_TMA=True)
    rule = launch.TUNING.rules["dkdv"]("sm90", block_d=128, gate=True)
    assert rule != entry
    override_tuning(launch.TUNING, measured={("dkdv", "sm90", 128, True): entry})
    assert launch.TUNING.config("dkdv", "sm90", block_d=128, gate=True) == entry
    assert launch.TUNING.config("dkdv", "sm80", block_d=128, gate=True) == rule
    assert launch.TUNING.config("dkdv", "sm90", block_d=128, gate=False) == launch.TUNING.rules["dkdv"](
        "sm90", block_d=128, gate=False)
    assert "USE_TMA" not in launch.TUNING.config("forward", "sm90", block_d=128, gate=True)
    assert launch.kernel_config("dkdv", 100, True, torch.device("cpu")) != entry  # another architecture
