"""The gate gradient's error along a long sequence, and what its flux assembly costs.

    python benchmarks/bench_gate_gradient.py --out benchmarks/results     # GPU, about a minute
    python benchmarks/bench_gate_gradient.py --quick --out /tmp/dg         # CPU logic check

dg is assembled from chunk-boundary fluxes (gatedfwa/ops/window_attention/gate_flux.py); the
plain reverse sum of dU over the whole sequence (what windows too long for the flux buffer
still use) is the "plain" variant, selected here by the knob max_flux_tiles_per_block_m = 0, and its dq
kernel compiles without any flux code. The flux tile totals are stored one part per warp on
NVIDIA GPUs (backward._store_warp_totals); the "per tile" variant (knob warp_flux_totals =
False) times the portable path, one tl.sum and one store per tile, beside it.

Writes gate_gradient.json/.md under --out:
  numerics  T = 2^20 in one sequence, float32, gates around -0.01, D = 64, w in {256, 1024}: max
            |dg - float64 reference| over the first and the last 1000 positions (references
            on slices with one window of context each side: exact for the slice), and their
            ratio (target: first <= 2 x last), flux and plain.
  timing    backward ms (forward saved, torch.autograd.grad of o) and the dq kernel's device
            ms (torch.profiler) with flux, flux per tile and plain at that length, at the
            gpu-125m training shape (B 8, T 4096, HQ 12, D 64, w 1024, bf16) and at B 4
            T 8192 HQ 16 (D 64 w 512, D 128 w 512 and 2048, bf16), and the flux's share of the
            backward (target: <= 1% at T = 2^20).
GATEDFWA_COMMIT names the commit measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

QUICK = "--quick" in sys.argv
if QUICK and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("GATEDFWA_BACKEND", "triton")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import bench_ms, environment, error_record, kernel_device_ms, write_results  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402
from gatedfwa.ops.window_attention import launch  # noqa: E402
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLUX_LIMIT = launch.TUNING.knobs.max_flux_tiles_per_block_m
VARIANTS = {"flux": FLUX_LIMIT, "plain": 0}
# Timing also runs the flux with one total per tile: (flux limit, per-warp totals) per variant.
TIMED = {"flux": (FLUX_LIMIT, True), "flux per tile": (FLUX_LIMIT, False), "plain": (0, True)}


def inputs(batch, seqlen, heads, head_dim, dtype, gate_level=-0.01, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v, do = (torch.randn(batch, seqlen, heads, head_dim, device=DEVICE, dtype=dtype, generator=generator)
                   for _ in range(4))
    g = gate_level * (1 + 0.5 * torch.rand(batch, seqlen, heads, device=DEVICE, generator=generator))
    return q, k, v, g, do


def gate_gradient(q, k, v, g, do, window):
    leaf = g.clone().requires_grad_()
    o = gated_window_attention(q, k, v, leaf, window_size=window)
    (dg,) = torch.autograd.grad(o, leaf, do)
    return dg


def numerics(seqlen: int, window: int, span: int) -> dict:
    q, k, v, g, do = inputs(1, seqlen, 2, 64 if not QUICK else 16, torch.float32)
    row = {"part": "numerics", "T": seqlen, "window": window, "dtype": "float32"}
    for name, limit in VARIANTS.items():
        with launch.TUNING.overridden(max_flux_tiles_per_block_m=limit):
            dg = gate_gradient(q, k, v, g, do, window)

        def error_of(start, stop):
            lo, hi = max(start - window, 0), min(stop + window, seqlen)
            pieces = [x[:, lo:hi].double().requires_grad_() for x in (q, k, v, g)]
            ref, _ = naive_gated_window_attention(*pieces, window_size=window)
            (dg_ref,) = torch.autograd.grad(ref, pieces[3], do[:, lo:hi].double())
            return (dg[:, start:stop].double() - dg_ref[:, start - lo:stop - lo]).abs().max().item()

        head, tail = error_of(0, span), error_of(seqlen - span, seqlen)
        row.update({f"{name} first err": head, f"{name} last err": tail, f"{name} first/last": head / tail})
    row["ok"] = row["flux first err"] <= 2 * row["flux last err"]
    return row


def timing(batch, seqlen, heads, head_dim, window, dtype) -> dict:
    q, k, v, g, do = inputs(batch, seqlen, heads, head_dim, dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    g = g.requires_grad_()
    o = gated_window_attention(q, k, v, g, window_size=window)
    row = {"part": "timing", "T": seqlen, "window": window, "dtype": str(dtype).replace("torch.", ""),
           "shape": f"B{batch} HQ{heads} D{head_dim}"}
    def backward():
        torch.autograd.grad(o, (q, k, v, g), do, retain_graph=True)

    for name, (limit, warp_totals) in TIMED.items():
        with launch.TUNING.overridden(max_flux_tiles_per_block_m=limit, warp_flux_totals=warp_totals):
            if DEVICE == "cuda":
                row[f"{name} backward ms"] = bench_ms(backward)
                kernels = kernel_device_ms(backward, iterations=10)
                row[f"{name} dq ms"] = sum(ms for kernel, ms in kernels.items() if "_dq_kernel" in kernel)
            else:
                backward()
    if DEVICE == "cuda":
        row["flux share"] = row["flux backward ms"] / row["plain backward ms"] - 1
        row["ok"] = row["flux share"] <= 0.01
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true")
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args, strict=not args.quick)
    long = 4096 if QUICK else 2**20
    span = 256 if QUICK else 1000
    jobs = [lambda w=w: numerics(long, w, span) for w in ((16,) if QUICK else (256, 1024))]
    if QUICK:
        jobs += [lambda: timing(1, 256, 2, 16, 16, torch.float32)]
    else:
        jobs += [lambda: timing(1, long, 2, 64, 256, torch.float32),
                 lambda: timing(1, long, 2, 64, 1024, torch.float32),
                 lambda: timing(8, 4096, 12, 64, 1024, torch.bfloat16),
                 lambda: timing(4, 8192, 16, 64, 512, torch.bfloat16),
                 lambda: timing(4, 8192, 16, 128, 512, torch.bfloat16),
                 lambda: timing(4, 8192, 16, 128, 2048, torch.bfloat16)]
    rows = []
    for job in jobs:
        try:
            rows.append(job())
        except Exception as exc:  # noqa: BLE001 - record and go on
            rows.append(error_record(exc))
        print(rows[-1], flush=True)
    payload = {"environment": environment(), "quick": QUICK, "rows": rows}
    columns = ["part", "T", "window", "dtype", "shape", "flux first err", "flux last err", "flux first/last",
               "plain first err", "plain last err", "plain first/last", "flux backward ms", "flux per tile backward ms",
               "plain backward ms", "flux share", "flux dq ms", "flux per tile dq ms", "plain dq ms", "ok", "error"]
    write_results(args.out, "gate_gradient_quick" if QUICK else "gate_gradient", payload, rows, columns)


if __name__ == "__main__":
    main()
