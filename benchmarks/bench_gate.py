"""Fused gate preprocessing on a GPU: numerics on the hardware, memory bandwidth of the
kernels, and the end-to-end cost of gating (gate + gated attention vs ungated attention).

    python benchmarks/bench_gate.py --out benchmarks/results     # GPU, about a minute
    python benchmarks/bench_gate.py --quick --out /tmp/gate       # CPU smoke check, no timing

Writes (under --out):
  gate_numerics.json/.md    extremes and random inputs at full size vs a float64 reference
  gate_bandwidth.json/.md   B=4, T=8192, H=16 (and larger): bytes moved / time, as % of the
                            device copy bandwidth measured in the same run (a large copy), and
                            against copies of the same bytes (one copy per kernel)
  gate_end_to_end.json/.md  B=4, T=8192, H=16, D=128, bf16, w in {512, 2048}: forward+backward
                            of [fused gate + gated attention] / [attention with g=None], and
                            the unfused PyTorch gate (eager, torch.compile) + the same attention;
                            also each step's kernel time alone, that of its gate kernels (all
                            but the attention's four) and the host's time to issue it
Every variant runs in its own try block: an error is recorded in the JSON and the run goes on.
With --quick the files are named *_quick and hold no timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

QUICK = "--quick" in sys.argv
# End-to-end rounds: each variant is timed this many times, interleaved (median reported).
E2E_ROUNDS = 1 if QUICK else 5
if QUICK and not torch.cuda.is_available():
    # The smoke check runs the Triton gate kernels through the interpreter when there is no
    # GPU; that must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import bench_ms, environment, error_record, kernel_device_ms, measure_ceilings, write_results  # noqa: E402

from gatedfwa import gated_window_attention, log_gates_from_projection  # noqa: E402
from gatedfwa.ops.gate import kernels as gate_kernels  # noqa: E402
from gatedfwa.ops.gate import launch as gate_launch  # noqa: E402
from gatedfwa.ops.window_attention.chunk_sums import chunk_gate_sums_from_projection  # noqa: E402
from gatedfwa.ops.gate.op import compute_log_gates  # noqa: E402
from gatedfwa.ops.gate.naive import naive_log_gates  # noqa: E402
from gatedfwa.ops.window_attention.fused_gate import _fused_gate_attention as fused_gate_attention  # noqa: E402
from gatedfwa.ops.window_attention.launch import gate_chunk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TIMING = DEVICE == "cuda" and not QUICK


def time_or_run(fn, grad_to_none=None):
    """Median ms on the GPU; elsewhere run once (logic check) and return None."""
    if TIMING:
        return bench_ms(fn, grad_to_none=grad_to_none)
    fn()
    return None


# --------------------------------------------------------------------------------------
# Numerics on the hardware: the custom exp / log1p of the kernels run on the real device
# --------------------------------------------------------------------------------------


def gate_grads(fn, a, beta_pre, dg):
    a = a.detach().clone().requires_grad_()
    beta_pre = beta_pre.detach().clone().requires_grad_()
    g = fn(a, beta_pre)
    return (g.detach(), *torch.autograd.grad(g, (a, beta_pre), dg.to(g.dtype)))


def numerics(rows_per_grid: int) -> dict:
    """Max elementwise relative error (1e-9 absolute slack) of g, da, dbeta_pre against the
    float64 formula, for the extreme grid (a up to +-1e4, beta_pre -50..50) and random inputs;
    and whether everything is finite."""
    results = []
    magnitudes = torch.tensor([1e4, 1e3, 30.0, 1.0, 1e-3])
    a_values = torch.cat([magnitudes, -magnitudes, torch.zeros(1)])
    beta_values = torch.linspace(-50, 50, 201)
    a_grid, beta_grid = torch.meshgrid(a_values, beta_values, indexing="ij")
    cases = {
        "extremes fp32": (a_grid.reshape(1, -1, 1).float(), beta_grid.reshape(1, -1, 1).float()),
        "random fp32": (torch.randn(1, rows_per_grid, 16) * 4, torch.randn(1, rows_per_grid, 16) * 3),
    }
    for name, (a, beta_pre) in cases.items():
        try:
            a, beta_pre = a.to(DEVICE), beta_pre.to(DEVICE)
            dg = torch.randn(a.shape, dtype=torch.float64, device=DEVICE)
            fast = gate_grads(compute_log_gates, a, beta_pre, dg)
            ref = gate_grads(naive_log_gates, a.double(), beta_pre.double(), dg)
            row = {"case": name, "elements": a.numel()}
            ok = True
            for label, x, r in zip(("g", "da", "dbeta_pre"), fast, ref):
                error = (x.double() - r).abs()
                finite = bool(torch.isfinite(x).all())
                # The tests' bound: |x - r| <= 2e-5 |r| + 1e-9 (the float64 formula itself
                # carries ~|a| 1e-16 of cancellation in its beta gradient).
                within = bool((error <= 2e-5 * r.abs() + 1e-9).all())
                large = r.abs() >= 1e-6
                row[f"{label} max rel err"] = (error[large] / r.abs()[large]).max().item() if large.any() else 0.0
                row[f"{label} finite"] = finite
                ok &= finite and within
            row["ok"] = ok
        except Exception as exc:  # noqa: BLE001 - record and continue
            row = {"case": name, **error_record(exc)}
        results.append(row)
    return {"rows": results}


# --------------------------------------------------------------------------------------
# Bandwidth of the fused kernels
# --------------------------------------------------------------------------------------


def gate_bytes(rows: int, heads: int, in_bytes: int, programs: int) -> tuple[int, int]:
    """Bytes the fused forward and backward kernels read + write (each byte counted once).
    forward (gate_sums):  gate_pre [rows, 2H] + bias [H] in, sums P and S 2 x [rows, H] float32 out
    backward (gate):      dg [B, H, T] float32 + gate_pre + bias in, d_gate_pre [rows, 2H] out,
                          plus the per-program bias partial sums (written, then summed)."""
    forward = rows * 2 * heads * in_bytes + heads * in_bytes + 2 * rows * heads * 4
    backward = rows * heads * 4 + 2 * rows * 2 * heads * in_bytes + heads * in_bytes + 2 * programs * heads * 4
    return forward, backward


def copy_gbps(num_bytes: int) -> float | None:
    """Bandwidth (read + write) of a device copy that moves num_bytes in total, by event
    timing (launch included) and by the copy kernel's own device time."""
    if not TIMING:
        return None, None
    src = torch.empty(max(num_bytes // 2, 1), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    kernel_ms = sum(kernel_device_ms(lambda: dst.copy_(src)).values())
    return 2 * src.numel() / ms / 1e6, 2 * src.numel() / kernel_ms / 1e6


def copy_kernel_ms(num_bytes: int) -> float | None:
    """Device time of a copy kernel that moves num_bytes in total (read + write)."""
    if not TIMING:
        return None
    src = torch.empty(max(num_bytes // 2, 1), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return sum(kernel_device_ms(lambda: dst.copy_(src)).values())


def bandwidth(sizes, dtype, ceiling_gbps) -> dict:
    """The two kernels of the fused path: gate sums from gate_pre (forward) and the gate
    backward reading dg in the attention's [B, H, T] layout. Two timings: do_bench around
    each launch (launch latency included), and the kernels' device time (profiler)."""
    rows_out = []
    for batch, seqlen, heads in sizes:
        row = {"B": batch, "T": seqlen, "H": heads, "dtype": str(dtype).replace("torch.", "")}
        try:
            rows = batch * seqlen
            chunk = gate_chunk(128, torch.device(DEVICE))  # what the attention path uses at D = 128
            gate_pre = torch.randn(batch, seqlen, 2 * heads, device=DEVICE, dtype=dtype) * 3
            bias = torch.randn(heads, device=DEVICE, dtype=dtype)
            dg = torch.randn(batch, heads, seqlen, device=DEVICE, dtype=torch.float32)
            flat = gate_pre.view(rows, 2 * heads)
            a_view, beta_view = flat[:, :heads], flat[:, heads:]
            d_gate_pre = torch.empty_like(flat)
            da_view, dbeta_view = d_gate_pre[:, :heads], d_gate_pre[:, heads:]
            _, _, programs = gate_launch.launch_shape(rows, heads, gate_launch.program_config(torch.device(DEVICE))["ELEMENTS"])
            fwd_bytes, bwd_bytes = gate_bytes(rows, heads, gate_pre.element_size(), programs)

            def forward():
                return chunk_gate_sums_from_projection(gate_pre, bias, chunk)

            def backward():
                return gate_kernels.gate_backward_2d(dg, a_view, beta_view, bias, da_view, dbeta_view, dg_seqlen=seqlen)

            fwd_ms = time_or_run(forward)
            bwd_ms = time_or_run(backward)
            total = fwd_bytes + bwd_bytes
            row.update({"forward MB": fwd_bytes / 1e6, "backward MB": bwd_bytes / 1e6,
                        "forward ms": fwd_ms, "backward ms": bwd_ms})
            if TIMING:
                fwd_kernels = kernel_device_ms(forward)
                bwd_kernels = kernel_device_ms(backward)
                # The backward's d(bias) partial sums are added by a small torch reduction.
                kernel_ms = sum(fwd_kernels.values()) + sum(bwd_kernels.values())
                copy_event, copy_kernel = copy_gbps(total)
                # The forward and the backward are separate passes by nature (they run at
                # different times in a training step), so the like-for-like reference is a
                # copy of the forward's bytes plus a copy of the backward's.
                copies_ms = copy_kernel_ms(fwd_bytes) + copy_kernel_ms(bwd_bytes)
                row.update({
                    "two same-bytes copies kernel ms": copies_ms,
                    "kernel % of two same-bytes copies": 100 * copies_ms / kernel_ms,
                    "forward kernel ms": sum(fwd_kernels.values()),
                    "backward kernel ms": sum(bwd_kernels.values()),
                    "event GB/s": total / (fwd_ms + bwd_ms) / 1e6,
                    "event % of copy BW": 100 * total / (fwd_ms + bwd_ms) / 1e6 / ceiling_gbps,
                    "kernel GB/s": total / kernel_ms / 1e6,
                    "kernel % of copy BW": 100 * total / kernel_ms / 1e6 / ceiling_gbps,
                    "same-bytes copy event GB/s": copy_event,
                    "same-bytes copy kernel GB/s": copy_kernel,
                    "kernels": {**fwd_kernels, **bwd_kernels},
                })
        except Exception as exc:  # noqa: BLE001
            row.update(error_record(exc))
        rows_out.append(row)
    return {"rows": rows_out}


# --------------------------------------------------------------------------------------
# End to end: gate + attention, forward + backward
# --------------------------------------------------------------------------------------


def unfused_gate(gate_pre, bias):
    """The gate as plain PyTorch code would write it (float32 math, several kernels)."""
    heads = gate_pre.shape[-1] // 2
    a, beta_pre = gate_pre.float().split(heads, dim=-1)
    beta = 1 + F.elu(beta_pre)
    z = beta * (a + bias.float())
    return F.logsigmoid(z) / beta


# The attention's own kernels (gatedfwa/ops/window_attention/), the same in every variant.
ATTENTION_KERNELS = ("_forward_kernel", "_delta_kernel", "_dq_kernel", "_dkdv_kernel")


def kernels_and_host(step, leaves) -> dict:
    """What the event timing of a step mixes: the device time of its kernels alone (profiler,
    no launch gaps) and the host's time to issue it (wall time of 20 steps issued without
    waiting for the GPU, per step). When the host time nears the kernel time, the GPU idles
    between kernels and the event timing measures the host. "gate kernels ms" is the device
    time of every kernel but the attention's four: the gate, its sums and dg's reverse sum,
    where the variants differ."""
    import time

    def fresh_step():
        for leaf in leaves:
            leaf.grad = None  # no gradient accumulation kernels
        step()

    per_kernel = kernel_device_ms(fresh_step)
    kernels_ms = sum(per_kernel.values())
    attention_ms = sum(ms for name, ms in per_kernel.items() if any(k in name for k in ATTENTION_KERNELS))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        fresh_step()
    host_ms = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    return {"kernels ms": kernels_ms, "gate kernels ms": kernels_ms - attention_ms, "host ms": host_ms}


def end_to_end(batch, seqlen, heads, head_dim, windows, dtype) -> dict:
    rows = []
    compile_backend = "inductor" if DEVICE == "cuda" else "eager"  # CPU smoke: no C++ build
    compiled_gate = torch.compile(unfused_gate, backend=compile_backend, dynamic=False)

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=DEVICE, dtype=dt) * scale).requires_grad_()

    for window in windows:
        q = leaf(batch, seqlen, heads, head_dim)
        k = leaf(batch, seqlen, heads, head_dim)
        v = leaf(batch, seqlen, heads, head_dim)
        # Gate projections that give the usual gates (mean log gate ~ -0.05).
        gate_pre = (torch.randn(batch, seqlen, 2 * heads, device=DEVICE, dtype=dtype)).requires_grad_()
        bias = (torch.full((heads,), 3.0, device=DEVICE, dtype=dtype)).requires_grad_()
        g_leaf = F.logsigmoid(torch.randn(batch, seqlen, heads, device=DEVICE) + 3).requires_grad_()
        do = torch.randn(batch, seqlen, heads, head_dim, device=DEVICE, dtype=dtype)

        def attend(g):
            return gated_window_attention(q, k, v, g, window_size=window)

        variants = {
            "attention g=None": (lambda: attend(None).backward(do), [q, k, v]),
            "attention, precomputed g": (lambda: attend(g_leaf).backward(do), [q, k, v, g_leaf]),
            "fused gate + attention (one op)": (
                lambda: fused_gate_attention(q, k, v, gate_pre, bias, window, head_dim**-0.5, None)[0].backward(do),
                [q, k, v, gate_pre, bias]),
            "Triton gate kernel + attention": (
                lambda: attend(log_gates_from_projection(gate_pre, bias)).backward(do), [q, k, v, gate_pre, bias]),
            "eager torch gate + attention": (
                lambda: attend(unfused_gate(gate_pre, bias)).backward(do), [q, k, v, gate_pre, bias]),
            "compiled torch gate + attention": (
                lambda: attend(compiled_gate(gate_pre, bias)).backward(do), [q, k, v, gate_pre, bias]),
        }
        window_rows = {}
        for name, (step, _) in variants.items():
            window_rows[name] = {"window": window, "variant": name, "runs ms": []}
            try:
                step()  # first call: compilation / autotuning outside the timing
            except Exception as exc:  # noqa: BLE001
                window_rows[name].update(error_record(exc))
        # Round-robin: every variant is timed once per round, so that drifts of the clock or
        # of the host hit all of them alike; each figure is the median over the rounds.
        for _ in range(E2E_ROUNDS):
            for name, (step, leaves) in variants.items():
                row = window_rows[name]
                if "error" in row:
                    continue
                try:
                    ms = time_or_run(step, grad_to_none=leaves)
                    if ms is not None:
                        row["runs ms"].append(ms)
                except Exception as exc:  # noqa: BLE001
                    row.update(error_record(exc))
        for row in window_rows.values():
            if row["runs ms"]:
                row["fwd+bwd ms"] = statistics.median(row["runs ms"])
        if TIMING:
            for name, (step, leaves) in variants.items():
                if "error" not in window_rows[name]:
                    window_rows[name].update(kernels_and_host(step, leaves))
        base = window_rows["attention g=None"].get("fwd+bwd ms")
        base_kernels = window_rows["attention g=None"].get("kernels ms")
        for row in window_rows.values():
            if base and row.get("fwd+bwd ms"):
                row["x of g=None"] = row["fwd+bwd ms"] / base
                row["x range"] = f"{min(row['runs ms']) / base:.3f}-{max(row['runs ms']) / base:.3f}"
            if base_kernels and row.get("kernels ms"):
                row["kernels x of g=None"] = row["kernels ms"] / base_kernels
        rows.extend(window_rows.values())
        del q, k, v, gate_pre, bias, g_leaf, do
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no timing: a logic check (CPU)")
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args, strict=not args.quick)
    suffix = "_quick" if QUICK else ""
    env = environment()

    ceilings = {}
    if TIMING:
        try:
            ceilings = measure_ceilings()
        except Exception as exc:  # noqa: BLE001
            ceilings = error_record(exc)
    ceiling = ceilings.get("copy_GBps")

    # 1. numerics on the device
    forced = os.environ.get("GATEDFWA_BACKEND")
    os.environ["GATEDFWA_BACKEND"] = "triton"  # the kernels (interpreted on a CPU smoke run)
    try:
        num = numerics(rows_per_grid=64 if QUICK else 32768)
    finally:
        if forced is None:
            del os.environ["GATEDFWA_BACKEND"]
        else:
            os.environ["GATEDFWA_BACKEND"] = forced
    write_results(args.out, f"gate_numerics{suffix}", {"environment": env, **num}, num["rows"],
                  ["case", "elements", "g max rel err", "da max rel err", "dbeta_pre max rel err",
                   "g finite", "da finite", "dbeta_pre finite", "ok", "error"])
    print("numerics:", [(r["case"], r.get("ok", r.get("error"))) for r in num["rows"]])

    # 2. bandwidth (the triton launchers are called directly)
    sizes = [(1, 64, 16), (1, 37, 5)] if QUICK else [(4, 8192, 16), (16, 8192, 16), (64, 8192, 16)]
    bw = bandwidth(sizes, torch.bfloat16, ceiling_gbps=ceiling)
    payload = {"environment": env, "ceilings": ceilings, "target": ">= 70% of copy BW at B=4,T=8192,H=16", **bw}
    columns = ["B", "T", "H", "dtype", "forward MB", "backward MB", "forward ms", "backward ms",
               "event GB/s", "event % of copy BW", "forward kernel ms", "backward kernel ms",
               "kernel GB/s", "kernel % of copy BW", "same-bytes copy event GB/s",
               "same-bytes copy kernel GB/s", "two same-bytes copies kernel ms",
               "kernel % of two same-bytes copies", "error"]
    write_results(args.out, f"gate_bandwidth{suffix}", payload, bw["rows"], columns)
    print("bandwidth:", [(r["B"], r.get("kernel % of copy BW"), r.get("kernel % of two same-bytes copies"),
                          r.get("error")) for r in bw["rows"]])

    # 3. end to end
    if QUICK:
        e2e = end_to_end(1, 64, 4, 16, (8, 32), torch.float32)
    else:
        e2e = end_to_end(4, 8192, 16, 128, (512, 2048), torch.bfloat16)
    payload = {"environment": env, "config": {"B": 1 if QUICK else 4, "T": 64 if QUICK else 8192,
                                              "H": 4 if QUICK else 16, "D": 16 if QUICK else 128,
                                              "dtype": "float32" if QUICK else "bfloat16"},
               "target": "fused gate + attention (one op) <= 1.10 x attention g=None", **e2e}
    write_results(args.out, f"gate_end_to_end{suffix}", payload, e2e["rows"],
                  ["window", "variant", "fwd+bwd ms", "x of g=None", "x range", "kernels ms",
                   "kernels x of g=None", "gate kernels ms", "host ms", "error"])
    print("end to end:", [(r["window"], r["variant"], r.get("x of g=None"), r.get("error")) for r in e2e["rows"]])


if __name__ == "__main__":
    main()
