"""The Hopper variant of the window attention kernels (launch.py: USE_TMA)
against the float64 naive reference, with the rule of docs/correctness.md, and the kernel
sweep's selection of winners (benchmarks/sweep_to_configs.py).

On the CPU the interpreter runs the descriptor loads (tensor descriptors, zero-filled outside
the sequence) with the interpreter's tile sizes; the GPU test runs them compiled at the real
tile sizes.
"""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.window_attention import launch

VARIANTS = {"tma": dict(USE_TMA=True)}


def with_variant(monkeypatch, flags: dict) -> list[dict]:
    """Add flags to every kernel's configuration; returns the list of configurations the
    launchers end up using (after usable_config), to show which path ran."""
    base = dict(launch.CONFIGS)
    configs = {kernel: (lambda f: lambda d, has_gate=True: {**f(d, has_gate), **flags})(base[kernel])
               for kernel in base}
    monkeypatch.setattr(launch, "CONFIGS", configs)
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
def test_variants_varlen_gqa(triton_backend, device, monkeypatch, variant, window, gate, make_inputs,
                             check_against_reference, triton_op):
    """Packed sequences (empty, length 1, straddling tiles) and GQA 2:1: the descriptors are
    per sequence, so tiles reaching before its start or past its end must read zeros."""
    used = with_variant(monkeypatch, VARIANTS[variant])
    cu_seqlens = torch.tensor([0, 0, 1, 18, 51, 90], dtype=torch.int32, device=device)
    q, k, v, g = make_inputs(1, 90, 4, 2, 32, gate, torch.bfloat16, device)
    check_against_reference(triton_op, q, k, v, g, window, cu_seqlens)
    assert len(used) == 3 and all(config["USE_TMA"] for config in used)


def test_tma_batched_fp32(triton_backend, device, monkeypatch, make_inputs, check_against_reference, triton_op):
    used = with_variant(monkeypatch, VARIANTS["tma"])
    q, k, v, g = make_inputs(2, 45, 2, 1, 16, True, torch.float32, device)
    check_against_reference(triton_op, q, k, v, g, 19)
    assert all(config["USE_TMA"] for config in used)


def test_tma_falls_back_where_unaligned(triton_backend, device, monkeypatch, make_inputs, check_against_reference,
                                        triton_op):
    """D = 20 in bf16 with one head: a token stride of 40 bytes, which TMA cannot address;
    the launchers drop USE_TMA and the pointer loads give the right answer."""
    used = with_variant(monkeypatch, VARIANTS["tma"])
    q, k, v, g = make_inputs(1, 40, 1, 1, 20, True, torch.bfloat16, device)
    assert not launch.descriptors_usable(q, k, v)
    check_against_reference(triton_op, q, k, v, g, 9)
    assert used and not any(config["USE_TMA"] for config in used)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: descriptors compiled at real tile sizes")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head_dim,q_heads,kv_heads,window", [(128, 4, 4, 300), (64, 8, 1, 1000), (128, 4, 2, None)])
def test_variants_gpu(triton_backend, monkeypatch, variant, head_dim, q_heads, kv_heads, window, make_inputs,
                      check_against_reference, triton_op):
    """Sequences of many tiles, batched and packed, with launch.py's tile sizes plus the
    variant's switches (on a GPU without TMA the launchers fall back, and the test still
    checks the answer)."""
    with_variant(monkeypatch, VARIANTS[variant])
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


def test_tuned_entries_take_precedence(monkeypatch):
    """A tuned.py entry replaces launch.py's default for its kernel, head size and gate only."""
    if launch.interpreting():
        monkeypatch.setattr(launch, "interpreting", lambda: False)
    entry = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, USE_TMA=True)
    monkeypatch.setattr(launch, "TUNED", {("dkdv", 128, True): entry})
    assert launch.CONFIGS["dkdv"](128, True) == entry
    assert launch.CONFIGS["dkdv"](100, True) == entry  # BLOCK_D 128
    assert "USE_TMA" not in launch.CONFIGS["dkdv"](128, False)
    assert "USE_TMA" not in launch.CONFIGS["forward"](128, True)


def test_sweep_winners_and_table(tmp_path, benchmark_script):
    """The winner is the fastest candidate summed over the windows that passed its check and
    was timed at every window; the written table is valid Python holding the winners."""
    module = benchmark_script("sweep_to_configs")
    fast = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, USE_TMA=True)
    slow = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    wrong = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=True)
    partial = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4)

    def row(config, window, ms, check="ok", kernel="forward", head_dim=128, gate=True):
        return dict(kernel=kernel, head_dim=head_dim, gate=gate, window=window, config=config, check=check,
                    kernel_ms=ms)

    rows = [row(fast, 512, 1.0), row(fast, 2048, 3.0), row(slow, 512, 0.9), row(slow, 2048, 3.5),
            row(wrong, 512, 0.1, check="o: max error 1e-1 exceeds"), row(wrong, 2048, 0.1, check="o: ..."),
            row(partial, 512, 0.05), {**row(partial, 2048, None), "error": "OutOfMemoryError"},
            row(slow, 512, 0.4, kernel="dkdv", head_dim=64, gate=False)]
    best = module.best_configs(rows)
    assert best == {("forward", 128, True): fast, ("dkdv", 64, False): slow}
    out = tmp_path / "tuned.py"
    out.write_text(module.table_source(best, {"gpu": "test GPU"}))
    namespace = {}
    exec(out.read_text(), namespace)
    assert namespace["TUNED"] == best


def test_sweep_runs_end_to_end_on_cpu(triton_backend, monkeypatch, tmp_path, benchmark_script):
    """The sweep's logic at toy sizes under the interpreter, with the GPU timers replaced by
    stand-ins that still call the step: every candidate is checked, timed, ranked, and the
    winners are timed against launch.py's choice (GPU numbers come from the sweep itself)."""
    if not launch.interpreting():
        pytest.skip("checks the sweep's logic on the CPU; on a GPU, run the sweep itself")
    bench = benchmark_script("bench_attention")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "CHECK_SEQLEN", 40)
    monkeypatch.setattr(bench, "CHECK_HEADS", 2)
    monkeypatch.setattr(bench, "CHECK_WINDOW", 20)
    calls = []

    def fake_kernel_ms(step, iterations=10):
        step()
        calls.append(step)
        return {"_forward_kernel": 1.0 + 0.1 * len(calls), "_dq_kernel": 2.0, "_dkdv_kernel_0d1": 3.0, "other": 0.5}

    monkeypatch.setattr(bench, "kernel_device_ms", fake_kernel_ms)
    monkeypatch.setattr(bench, "bench_ms", lambda fn, grad_to_none=None: (fn(), 1.0)[1])
    tma = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, USE_TMA=True)
    monkeypatch.setattr(bench, "SWEEP", {"forward": [tma], "dq": [], "dkdv": [dict(tma, BLOCK_M=16, BLOCK_N=32)]})
    rows, best = bench.sweep(shapes=[(1, 48, 2, 16, 16)])
    assert {row["check"] for row in rows} == {"ok"}
    assert len(rows) == 2 * (2 + 1 + 2)  # gates x (forward, dq, dk/dv candidates incl. the default)
    assert all(row["step kernels ms"] == pytest.approx(row["forward ms"] + 5.5) for row in rows)
    assert {row["dkdv ms"] for row in rows} == {3.0}
    # The default forward was timed first, so it wins (the stand-in grows with every call).
    assert best[("forward", 16, True)] == launch.CONFIGS["forward"](16, True)
    assert best[("dkdv", 16, False)] in (launch.CONFIGS["dkdv"](16, False), dict(tma, BLOCK_M=16, BLOCK_N=32))
    timed = bench.time_best(best, [(1, 48, 2, 1, 16, 16, True)], "test")
    assert len(timed) == 4 and not any("error" in row for row in timed)
    assert timed[0]["gated / ungated fwd+bwd"] == 1.0
