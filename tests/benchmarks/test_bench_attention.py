"""The side-by-side timing (benchmarks/bench_attention.py) and its FlexAttention peer
(benchmarks/flex_peers.py): the gated FlexAttention function computes gatedfwa's output and
gradients, dg included (on the CPU through FlexAttention's unfused path; compiled on a GPU),
and the --quick run writes every row."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import flex_peers  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402

pytest.importorskip("torch.nn.attention.flex_attention")


def _inputs(batch, seqlen, heads, head_dim, dtype, device):
    q, k, v, do = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype) for _ in range(4))
    g = torch.nn.functional.logsigmoid(torch.randn(batch, seqlen, heads, device=device) + 3)
    return q, k, v, g, do


def _gradients(fn, inputs, do):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o = fn(*leaves)
    return [o.detach(), *torch.autograd.grad(o, leaves, do)]


def _flex_and_op(q, k, v, g, do, window, flex_fn):
    """(o, dq, dk, dv, dg) of flex_fn on heads-first copies (returned in gatedfwa's layout) and
    of gatedfwa's op."""
    block_mask = flex_peers.sliding_window_block_mask(q.shape[1], window, q.device)

    def flex(q, k, v, g):
        return flex_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g, block_mask).transpose(1, 2)

    def op(q, k, v, g):
        return gated_window_attention(q, k, v, g, window_size=window)

    return _gradients(flex, (q, k, v, g), do), _gradients(op, (q, k, v, g), do)


def test_gated_flex_gives_the_ops_output_and_gradients_dg_included():
    """Float32 on the CPU, windows across FlexAttention's 128-token blocks, two sequences,
    through FlexAttention's unfused path (flex_peers.unfused_backward_on_cpu). The compiled
    GPU kernels are checked by the GPU test below and by bench_attention.py's "dg rel diff to
    gatedfwa" column at full size."""
    q, k, v, g, do = _inputs(2, 300, 2, 16, torch.float32, "cpu")
    with warnings.catch_warnings(), flex_peers.unfused_backward_on_cpu():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        flex, op = _flex_and_op(q, k, v, g, do, 40, flex_peers.gated_flex_attention)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dg"), flex, op):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{name}: max difference {(a - b).abs().max():.2e}"
    assert flex[4].abs().max() > 1e-2  # a gate gradient worth comparing


def test_detached_gate_gives_the_same_output_and_no_dg():
    q, k, v, g, do = _inputs(1, 200, 2, 16, torch.float32, "cpu")
    block_mask = flex_peers.sliding_window_block_mask(200, 30, "cpu")
    qt, kt, vt = (flex_peers.to_heads_first(x.requires_grad_()) for x in (q, k, v))
    g.requires_grad_()
    with warnings.catch_warnings(), flex_peers.unfused_backward_on_cpu():
        warnings.simplefilter("ignore", UserWarning)
        detached = flex_peers.gated_flex_attention(qt, kt, vt, g.detach(), block_mask)
        attached = flex_peers.gated_flex_attention(qt, kt, vt, g, block_mask)
        detached.backward(do.transpose(1, 2))
    assert g.grad is None and qt.grad is not None
    assert torch.equal(detached.detach(), attached.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: FlexAttention compiled")
def test_compiled_gated_flex_gives_the_ops_dg_on_gpu():
    """The function bench_attention.py times, compiled (cumulative sum and FlexAttention in one
    graph), against gatedfwa's op at a small bf16 shape: relative L2 differences of o and of
    every gradient within bf16 rounding."""
    flex_peers.allow_recompiles()
    q, k, v, g, do = _inputs(2, 512, 4, 64, torch.bfloat16, "cuda")
    flex, op = _flex_and_op(q, k, v, g, do, 100, flex_peers.compiled(flex_peers.gated_flex_attention))
    for name, a, b in zip(("o", "dq", "dk", "dv", "dg"), flex, op):
        difference = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert difference < 2e-2, f"{name}: relative difference {difference:.2e}"


def test_quick_run_writes_every_row(tmp_path):
    """--quick on the CPU: every implementation has its row on the same inputs, gatedfwa's
    rows are timed, the FlexAttention rows (unfused on the CPU) agree with gatedfwa's output
    and dg, and the files say quick and complete."""
    import bench_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bench_attention.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "attention_speed_quick.json").read_text())
    assert record["quick"] is True and record["complete"] is True
    assert record["environment"]["git_commit"]
    rows = {(row["shape"], row["implementation"]): row for row in record["rows"]}
    peers = "B1 T64 H2 D16 w16"
    names = [bench_attention.OURS, bench_attention.OURS_SWA, bench_attention.FLEX_DETACHED,
             bench_attention.FLEX_DG, bench_attention.FLEX_SWA, bench_attention.SDPA]
    for name in names:
        assert (peers, name) in rows, name
        assert rows[peers, name]["fwd ms"] > 0 and rows[peers, name]["fwd TFLOP/s"] > 0
    ours = rows[peers, bench_attention.OURS]
    assert ours["fwd+bwd ms"] > 0 and ours[f"fwd ms / {bench_attention.OURS}"] == 1.0
    assert "gated / ungated fwd+bwd, interleaved" in ours
    for name in names:
        assert rows[peers, name]["fwd+bwd ms"] > 0 and "error" not in rows[peers, name], name
    for name in (bench_attention.FLEX_DETACHED, bench_attention.FLEX_DG, bench_attention.FLEX_SWA):
        assert rows[peers, name]["o rel diff to gatedfwa"] < 2e-2, name
    assert rows[peers, bench_attention.FLEX_DG]["dg rel diff to gatedfwa"] < 2e-2
    assert "dg rel diff to gatedfwa" not in rows[peers, bench_attention.FLEX_DETACHED]
    assert "gated / ungated fwd+bwd, interleaved" in rows[peers, bench_attention.FLEX_DG]
    assert "no dg" in bench_attention.FLEX_DETACHED and "with dg" in bench_attention.FLEX_DG
    assert any(shape.endswith("varlen x1") for shape, _ in rows)  # gatedfwa alone, packed
    markdown = (tmp_path / "attention_speed_quick.md").read_text()
    assert bench_attention.FLEX_DG in markdown and "dg rel diff to gatedfwa" in markdown


def test_warming_processes_run_at_once_and_report(monkeypatch):
    """warm_in_parallel starts one process per shape, all before waiting for any, and reports
    each one's exit status, with the end of its error output where it failed (the processes
    here stand in for this script's --warm runs: they sleep 2 s, then fail on a shape of T = -1)."""
    import bench_attention

    script = ("import sys, time; time.sleep(2); T = int(sys.argv[2])\n"
              "if T < 0: raise SystemExit('ValueError: T must be positive')")
    monkeypatch.setattr(bench_attention, "warm_command", lambda shape, quick=False: [
        sys.executable, "-c", script, *map(str, shape)])
    good, impossible = (1, 64, 2, 16, 16), (1, -1, 2, 16, 16)
    records = bench_attention.warm_in_parallel([good, impossible, good], timeout_s=60)
    assert [record["shape"] for record in records] == [list(good), list(impossible), list(good)]
    assert [record["returncode"] for record in records] == [0, 1, 0]
    assert "T must be positive" in records[1]["stderr tail"] and "stderr tail" not in records[0]
    assert records[-1]["seconds"] < 5.5  # at once: three 2 s sleeps, not one after another


def test_warm_mode_runs_a_shape_without_writing(tmp_path, monkeypatch):
    """--warm runs one shape's rows once, on the CPU FlexAttention unfused, and writes nothing."""
    import bench_attention

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bench_attention.main(["--warm", *map(str, bench_attention.QUICK_SHAPES[0]), "--quick"])
    assert list(tmp_path.iterdir()) == []


def test_budget_skips_the_shapes_left_and_says_so(tmp_path):
    """A budget already spent: no shape runs, the files say incomplete and list every shape."""
    import bench_attention

    bench_attention.main(["--quick", "--budget-s", "0", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "attention_speed_quick.json").read_text())
    assert record["complete"] is False and record["rows"] == []
    expected = [list(shape) for shape in bench_attention.QUICK_SHAPES] + [
        [batch, seqlen, q_heads, head_dim, window]
        for batch, seqlen, q_heads, _, head_dim, window, _ in bench_attention.QUICK_MORE_SHAPES]
    assert record["skipped_shapes"] == expected
