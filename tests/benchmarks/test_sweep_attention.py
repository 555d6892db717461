"""The kernel sweep's logic (benchmarks/sweep_attention.py) end to end on the CPU, under the
Triton interpreter, with the GPU timers replaced by stand-ins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_sweep_runs_end_to_end_on_cpu(monkeypatch):
    """The sweep's logic at toy sizes under the interpreter, with the GPU timers replaced by
    stand-ins that still call the step: every candidate is checked, timed, ranked, and the
    winners are timed against launch.py's choice (GPU numbers come from the sweep itself)."""
    import sweep_attention
    from sweep_attention import launch

    if not sweep_attention.architecture(torch.device("cpu")) == "interpreter":
        pytest.skip("checks the sweep's logic on the CPU; on a GPU, run the sweep itself")
    monkeypatch.setenv("GATEDFWA_BACKEND", "triton")
    monkeypatch.setattr(sweep_attention, "CHECK_SEQLEN", 33)
    monkeypatch.setattr(sweep_attention, "CHECK_HEADS", 2)
    monkeypatch.setattr(sweep_attention, "CHECK_WINDOW", 17)
    calls = []

    def fake_kernel_ms(step, iterations=10):
        step()
        calls.append(step)
        return {"_forward_kernel": 1.0 + 0.1 * len(calls), "_dq_kernel": 2.0, "_dkdv_kernel_0d1": 3.0, "other": 0.5}

    monkeypatch.setattr(sweep_attention, "kernel_device_ms", fake_kernel_ms)
    monkeypatch.setattr(sweep_attention, "bench_ms", lambda fn, grad_to_none=None: (fn(), 1.0)[1])
    tma = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, USE_TMA=True)
    monkeypatch.setattr(sweep_attention, "SWEEP", {"forward": [tma], "dq": [], "dkdv": [dict(tma, BLOCK_M=16, BLOCK_N=32)]})
    rows, best = sweep_attention.sweep(shapes=[(1, 33, 2, 16, 16)])
    assert {row["check"] for row in rows} == {"ok"}
    assert len(rows) == 2 * (2 + 1 + 2)  # gates x (forward, dq, dk/dv candidates incl. the default)
    assert all(row["step kernels ms"] == pytest.approx(row["forward ms"] + 5.5) for row in rows)
    assert {row["dkdv ms"] for row in rows} == {3.0}
    # The default forward was timed first, so it wins (the stand-in grows with every call).
    assert best[("forward", 16, True)] == launch.TUNING.config("forward", "interpreter", block_d=16, gate=True)
    assert best[("dkdv", 16, False)] in (launch.TUNING.config("dkdv", "interpreter", block_d=16, gate=False),
                                         dict(tma, BLOCK_M=16, BLOCK_N=32))
    timed = sweep_attention.time_best(best, [(1, 33, 2, 1, 16, 16, True)], "test")
    assert len(timed) == 4 and not any("error" in row for row in timed)
    assert timed[0]["gated / ungated fwd+bwd"] == 1.0
