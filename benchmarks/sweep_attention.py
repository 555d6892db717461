"""Kernel configuration sweep of the window attention kernels, on a GPU.

    python benchmarks/sweep_attention.py --out benchmarks/results

For every kernel (forward, dq, dk/dv), head size (D = 128: w = 512 and 2048; D = 64: w =
512), gate setting and candidate configuration (tile sizes, warps, stages, Hopper tensor
descriptors USE_TMA; the other two kernels at launch.py's choice):

1. checks the op under that configuration against the naive float64 reference at B=1 T=1024
   H=16 w=320, with the rule of docs/correctness.md for o and every gradient;
2. times each kernel of one forward+backward at each shape (device time, torch.profiler, the
   L2 flushed before each step).

Then it picks the winner per kernel, head size and gate (sweep_to_configs.best_configs: least
device time summed over the windows, among candidates that passed), and times launch.py's
choice against the winners at the three target shapes, packed varlen (T = 32k in sequences of
256-2048), GQA 8:1 and T = 128k, gated and ungated. Candidates past 270 s are recorded as
skipped.

Writes attention_sweep.json/.md (every candidate), attention_sweep_best.json/.md (the winners
and their timing) and attention_launch_table.py (the winners as the launch table the library
reads: sweep_to_configs.py, which also rebuilds it from attention_sweep.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from attention_inputs import make_inputs, short_sequences  # noqa: E402
from common import attention_tflops, bench_ms, kernel_device_ms, start_gpu_run, window_pairs, write_results  # noqa: E402
from sweep_to_configs import LAUNCH_TABLE_NAME, PACKAGE_TABLE, best_configs, read_table, table_source  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402
from gatedfwa.ops.common.tuning import architecture  # noqa: E402
from gatedfwa.ops.window_attention import launch  # noqa: E402  (the tuning surface the sweep overrides)
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention  # noqa: E402


def _candidate(m, n, warps, stages, tma=False):
    config = dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
    if tma:
        config["USE_TMA"] = True
    return config


def candidate_label(config: dict) -> str:
    label = f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}"
    return label + (" tma" if config.get("USE_TMA") else "")


# Candidates per kernel besides launch.py's current choice. "tma": tiles through tensor
# descriptors. Compiled offline for sm_90 (benchmarks/kernel_instructions.py), D = 128 with the
# gate: dk/dv 64x64 w4 (the default) spills (255 registers, ~250 bytes of local stores),
# 64x64 w8 and 32x64 w4 do not. (Warp specialisation of the unmasked loop was a candidate:
# Triton 3.6's Hopper pass crashes on it at 4 warps, and at 8 warps, compiled without a
# producer/consumer split, it was the slowest forward: attention_sweep.md, docs/performance.md.)
SWEEP = {
    "forward": [_candidate(*c) for c in [
        (64, 64, 4, 3, True), (128, 64, 8, 3), (128, 64, 8, 3, True), (128, 128, 8, 3, True),
        (128, 128, 8, 2, True), (64, 32, 4, 4, True), (128, 64, 4, 3, True)]],
    "dq": [_candidate(*c) for c in [
        (64, 64, 4, 2, True), (64, 64, 4, 3, True), (128, 64, 8, 2, True), (64, 32, 4, 3, True),
        (128, 32, 8, 3, True)]],
    "dkdv": [_candidate(*c) for c in [
        (64, 64, 8, 2), (64, 64, 8, 2, True), (32, 64, 4, 3), (32, 64, 4, 3, True), (64, 64, 4, 2, True),
        (64, 128, 8, 2, True)]],
}
# The sweep's timing shapes (B, T, H, D, window) and the correctness shape of each head size,
# B=1 T=1024 H=16 w=320: the integer arguments keep the divisibility of the timing shapes, so
# Triton reuses the kernels compiled for the check.
SWEEP_SHAPES = [(4, 8192, 16, 128, 512), (4, 8192, 16, 128, 2048), (4, 8192, 16, 64, 512)]
# Targets of issue 16 in TFLOP/s over in-window pairs (forward, forward+backward), gated.
TARGETS = {(128, 2048): (450, 400), (128, 512): (330, 290), (64, 512): (260, 230)}
KERNEL_NAMES = {"forward": "_forward_kernel", "dq": "_dq_kernel", "dkdv": "_dkdv_kernel"}
CHECK_SEQLEN, CHECK_HEADS, CHECK_WINDOW = 1024, 16, 320


def _architecture() -> str:
    return architecture(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _with_configs(entries: dict):
    """launch.TUNING with {(kernel, BLOCK_D, gate): config} on top of its measured entries, on
    this machine's architecture, within the block."""
    arch = _architecture()
    extra = {(kernel, arch, block_d, gate): config for (kernel, block_d, gate), config in entries.items()}
    return launch.TUNING.overridden(measured={**launch.TUNING.measured, **extra})


def _step(q, k, v, g, do, window, cu_seqlens=None):
    """One forward+backward through the public op (gate sums included)."""
    def step():
        o = gated_window_attention(q, k, v, g, window_size=window, cu_seqlens=cu_seqlens)
        o.backward(do)
    return step


def check_variant(head_dim, gate):
    """The op under the current launch.TUNING against the naive float64 reference, with the
    rule of docs/correctness.md (bf16; the naive path in bf16 gives the bound). Returns "ok" or
    the failure."""
    from gatedfwa.testing import assert_within_rule, float32_slack

    q, k, v, g = make_inputs(1, CHECK_SEQLEN, CHECK_HEADS, CHECK_HEADS, head_dim, gate=gate)
    do = torch.randn_like(q)
    window = CHECK_WINDOW

    def outputs(fn, inputs):
        leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
        o = fn(*leaves)
        return [o.detach(), *torch.autograd.grad(o, [x for x in leaves if x is not None], do.to(o.dtype))]

    def naive(q, k, v, g):
        return naive_gated_window_attention(q, k, v, g, window_size=window)[0]

    fast = outputs(lambda q, k, v, g: gated_window_attention(q, k, v, g, window_size=window), (q, k, v, g))
    low = outputs(naive, (q, k, v, g))
    ref = outputs(naive, [None if x is None else x.double() for x in (q, k, v, g)])
    try:
        for name, a, b, c in zip(("o", "dq", "dk", "dv", "dg"), fast, low, ref):
            assert_within_rule(name, a, b, c, atol=float32_slack(c, q.dtype))
    except AssertionError as exc:
        return str(exc)[:200]
    return "ok"


def _kernel_times(step) -> dict:
    times = kernel_device_ms(step, iterations=10)
    row = {}
    for kernel, name in KERNEL_NAMES.items():
        row[f"{kernel} ms"] = sum(ms for key, ms in times.items() if name in key)
    if not row["forward ms"] or not row["dkdv ms"]:
        raise RuntimeError(f"the profiler named no attention kernel: {sorted(times)}")
    row["step kernels ms"] = sum(times.values())
    return row


def sweep(shapes=SWEEP_SHAPES, budget_s: float = 270.0):
    """For every kernel, head size, gate setting and candidate (the other kernels at launch.py's
    choice): a correctness check at a small shape, then the device time of each kernel of one
    forward+backward at each timing shape (torch.profiler). Candidates past budget_s are
    recorded as skipped. Returns (rows, best): best maps (kernel, BLOCK_D, gate) to the winner
    (sweep_to_configs.best_configs)."""
    started = time.time()
    rows = []
    arch = _architecture()
    head_dims = sorted({shape[3] for shape in shapes}, reverse=True)  # D = 128 first: two of the targets
    for head_dim in head_dims:
        for gate in (True, False):
            for kernel, candidates in SWEEP.items():
                block_d = launch.block_d_for(head_dim)
                default = launch.TUNING.config(kernel, arch, block_d=block_d, gate=gate)
                for config in [default] + [c for c in candidates if c != default]:
                    base = {"kernel": kernel, "head_dim": head_dim, "gate": gate, "config": config,
                            "candidate": candidate_label(config) + (" (default)" if config is default else "")}
                    if time.time() - started > budget_s:
                        rows.append({**base, "check": "skipped: time budget"})
                        continue
                    with _with_configs({(kernel, block_d, gate): config}):
                        try:
                            check = check_variant(head_dim, gate)
                        except Exception as exc:
                            check = f"{type(exc).__name__}: {exc}"[:200]
                    for batch, seqlen, heads, shape_d, window in shapes:
                        if shape_d != head_dim:
                            continue
                        row = {**base, "shape": f"B{batch} T{seqlen} H{heads} D{head_dim} w{window}",
                               "window": window, "check": check}
                        if check == "ok":
                            try:
                                q, k, v, g = make_inputs(batch, seqlen, heads, heads, head_dim, gate=gate,
                                                         requires_grad=True)
                                with _with_configs({(kernel, block_d, gate): config}):
                                    row.update(_kernel_times(_step(q, k, v, g, torch.randn_like(q), window)))
                                row["kernel_ms"] = row[f"{kernel} ms"]
                                pairs = window_pairs([seqlen] * batch, window)
                                share = 1.0 if kernel == "forward" else 1.25  # of the backward's 2.5
                                row["kernel TFLOP/s"] = 4 * heads * pairs * head_dim * share / row["kernel_ms"] / 1e9
                            except Exception as exc:
                                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                        rows.append(row)
                        print({key: row.get(key) for key in ("shape", "gate", "kernel", "candidate", "check",
                                                           "kernel_ms", "kernel TFLOP/s")}, flush=True)
    return rows, best_configs(rows)


def time_best(best, shapes, label):
    """Forward and forward+backward TFLOP/s of launch.py's configurations against the sweep's
    winners (in memory), gated and not, at each shape (B, T, HQ, H, D, window, varlen)."""
    rows = []
    for batch, seqlen, q_heads, kv_heads, head_dim, window, varlen in shapes:
        gated_rows = {}  # configs -> the gated row of this shape, for the gate's cost
        for gate in (True, False):
            q, k, v, g = make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, gate=gate, requires_grad=True)
            do = torch.randn_like(q)
            cu = None
            lengths = [seqlen] * batch
            if varlen:  # many short sequences: lengths 256-2048
                cu, lengths = short_sequences(seqlen)
            pairs = window_pairs(lengths, window)
            for which, table in (("launch.py", {}), ("sweep best", best)):
                row = {"part": label, "shape": f"B{batch} T{seqlen} HQ{q_heads} H{kv_heads} D{head_dim} w{window}"
                       + (f" varlen x{len(lengths)}" if varlen else ""), "gate": gate, "configs": which}
                with _with_configs(table):
                    try:
                        forward = lambda: gated_window_attention(q, k, v, g, window_size=window, cu_seqlens=cu)  # noqa: E731
                        with torch.no_grad():
                            forward()
                            ms = bench_ms(forward)
                        row["fwd ms"], row["fwd TFLOP/s"] = ms, attention_tflops(pairs, q_heads, head_dim, ms, backward=False)
                        step = _step(q, k, v, g, do, window, cu)
                        step()
                        ms = bench_ms(step, grad_to_none=[x for x in (q, k, v, g) if x is not None])
                        row["fwd+bwd ms"], row["fwd+bwd TFLOP/s"] = ms, attention_tflops(pairs, q_heads, head_dim, ms,
                                                                                        backward=True)
                        target = TARGETS.get((head_dim, window)) if not varlen and kv_heads == q_heads else None
                        if target and gate:
                            row["target fwd / fwd+bwd"] = f"{target[0]} / {target[1]}"
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                gated_row = gated_rows.get(which) if not gate else None
                if gated_row is not None and "fwd+bwd ms" in gated_row and "fwd+bwd ms" in row:
                    gated_row["gated / ungated fwd+bwd"] = gated_row["fwd+bwd ms"] / row["fwd+bwd ms"]
                gated_rows[which] = row
                rows.append(row)
                print(row, flush=True)
            del q, k, v, g, do
            torch.cuda.empty_cache()
    return rows


# Shapes timed after the sweep with its winners (B, T, HQ, H, D, window, varlen): the three
# targets, then packed varlen, GQA 8:1 and T = 128k.
BEST_SHAPES = [(4, 8192, 16, 16, 128, 512, False), (4, 8192, 16, 16, 128, 2048, False),
               (4, 8192, 16, 16, 64, 512, False), (1, 32768, 16, 16, 128, 512, True),
               (4, 8192, 32, 4, 128, 2048, False), (1, 131072, 16, 16, 128, 2048, False)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results and the launch table")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="candidates not started within this many seconds are recorded as skipped")
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    env = start_gpu_run(parser, args)
    started = time.time()
    rows, best = sweep(budget_s=args.budget_s)
    timed = time_best(best, BEST_SHAPES, "after sweep")
    best_rows = [{"kernel": kernel, "BLOCK_D": block_d, "gate": gate, "winner": candidate_label(config)}
                 for (kernel, block_d, gate), config in sorted(best.items())]
    print("best per kernel, head size and gate:", flush=True)
    for row in best_rows:
        print(row, flush=True)
    write_results(args.out, "attention_sweep", {"environment": env, "rows": rows, "seconds": time.time() - started},
                  rows, ["shape", "gate", "kernel", "candidate", "check", "forward ms", "dq ms", "dkdv ms",
                         "step kernels ms", "kernel TFLOP/s", "error"])
    write_results(args.out, "attention_sweep_best", {"environment": env, "best": best_rows, "timed": timed},
                  best_rows + timed, ["kernel", "BLOCK_D", "gate", "winner", "shape", "configs", "fwd ms",
                                      "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "gated / ungated fwd+bwd",
                                      "target fwd / fwd+bwd", "error"])
    table = Path(args.out) / LAUNCH_TABLE_NAME
    table.write_text(table_source(best, env, _architecture(), read_table(PACKAGE_TABLE)))
    print(f"sweep done in {time.time() - started:.0f} s; launch table: {table}", flush=True)


if __name__ == "__main__":
    main()
