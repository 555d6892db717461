"""benchmarks/bench_nsa.py --compare-selected's bookkeeping on the CPU (the PyTorch path, tiny
sizes, the timers replaced by a wall clock; the strategies' kernels are tested in
test_nsa_triton.py): every shape, strategy and variant gets a row, the ratio rows pair the
groups' strategies, and the strategy threshold (launch.TUNING's block_major_max_group) is
restored afterwards."""

from __future__ import annotations

import time

from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.nsa import launch


@use_backend("torch")
def test_compare_selected_rows(monkeypatch, benchmark_script):
    bench = benchmark_script("bench_nsa")
    for name, value in dict(DEVICE="cpu", HEAD_DIM=16, BLOCK_SIZE=16, BLOCK_COUNTS=2, WINDOW=16,
                            HEADS=[(16, 1), (1, 1)]).items():
        monkeypatch.setattr(bench, name, value)

    thresholds = []  # block_major_max_group in effect while each strategy is timed

    def wall_ms(fn, **_):
        thresholds.append(launch.TUNING.knobs.block_major_max_group)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000

    monkeypatch.setattr(bench, "bench_ms", wall_ms)
    monkeypatch.setattr(bench, "kernel_device_ms", lambda fn, iterations: {"_selected_output_kernel": 1.0,
                                                                           "_selected_dq_kernel": 2.0})
    default = launch.TUNING.knobs.block_major_max_group
    rows: list[dict] = []
    bench.compare_selected(36, rows)
    assert launch.TUNING.knobs.block_major_max_group == default
    assert sorted(set(thresholds)) == sorted(bench.STRATEGIES.values())
    assert not any("error" in row for row in rows), [row.get("error") for row in rows]
    assert {(row["shape"], row["strategy"], row["variant"]) for row in rows} == {
        (shape, strategy, variant)
        for shape in ("T36 HQ16 H1 (group 16)", "T36 HQ1 H1 (group 1)")
        for strategy in ("query-major", "block-major") for variant in ("gated NSA", "cmp+slc")}
    gated = [row for row in rows if row["variant"] == "gated NSA"]
    assert all(row["selected attention fwd (device ms)"] == 1.0 for row in gated)
    assert [row["default"] for row in gated] == [True, False, False, True]  # group 16 query-, group 1 block-major
    ratios = bench.compare_ratios(rows)
    assert len(ratios) == 4 and all(ratio["value"] > 0 for ratio in ratios)
