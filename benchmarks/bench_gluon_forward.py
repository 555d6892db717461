"""The window attention forward on Hopper: the warp-specialised Gluon kernel
(gatedfwa/ops/window_attention/gluon_forward.py) against the Triton kernel (forward.py) and
SDPA full causal, per shape, gated and not, on the same inputs.

    python benchmarks/bench_gluon_forward.py --out benchmarks/results      # H100/H200, about a minute
    python benchmarks/bench_gluon_forward.py --shapes 0 2 --out /tmp/gluon  # a selection (indices of SHAPES)

Rows per shape and gate setting:
  gluon         gluon_forward.gluon_attention_forward (what GATEDFWA_HOPPER_KERNELS=gluon runs)
  triton        forward.attention_forward with the Triton kernel (the default)
  SDPA causal   torch's scaled_dot_product_attention, is_causal (flash), all T(T+1)/2 pairs
Both window kernels get the same precomputed gate sums, so the rows time the attention kernel
alone. "ms" is the median wall time of a call (CUDA events, triton.testing.do_bench, which
includes the Gluon launcher's descriptor set-up on the host), "device ms" the kernel's own
time (torch.profiler, L2 flushed before each call). TFLOP/s count in-window pairs
(common.attention_tflops; SDPA its causal pairs). Each gluon row also records the largest
difference of its o and lse to the Triton kernel's: the check that the two compute the same
thing (bf16 rounding of o, about 1e-2; lse, float32, about 1e-5 relative).

GATEDFWA_HOPPER_KERNELS=gluon stays opt-in (gatedfwa/environment.py) until a committed run of
this script shows the Gluon kernel faster. Writes gluon_forward.json/.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from attention_inputs import make_inputs  # noqa: E402
from common import (  # noqa: E402
    attention_tflops, bench_ms, error_record, kernel_device_ms, start_gpu_run, window_pairs, write_results,
)

from gatedfwa.environment import HOPPER_KERNELS  # noqa: E402
from gatedfwa.ops.window_attention import forward, launch  # noqa: E402
from gatedfwa.ops.window_attention.chunk_sums import chunk_gate_sums  # noqa: E402

# B, T, HQ, H, D, window: the three target shapes of docs/performance.md, the gpu-125m layer
# (D = 64, w = 1024), GQA 8:1 and a long window.
SHAPES = [
    (4, 8192, 16, 16, 128, 512),
    (4, 8192, 16, 16, 128, 2048),
    (4, 8192, 16, 16, 64, 512),
    (8, 4096, 12, 12, 64, 1024),
    (4, 8192, 32, 4, 128, 2048),
    (1, 32768, 16, 16, 128, 8192),
]
COLUMNS = ["shape", "gate", "kernel", "ms", "device ms", "TFLOP/s", "x of triton", "max |o - triton|",
           "max |lse - triton|"]


def _shape_name(batch, seqlen, q_heads, kv_heads, head_dim, window) -> str:
    heads = f"HQ={q_heads}" + (f" H={kv_heads}" if kv_heads != q_heads else "")
    return f"B={batch} T={seqlen} {heads} D={head_dim} w={window}"


def _device_ms(fn) -> float:
    """The summed device time of the kernels fn launches (chunk sums are outside fn)."""
    return sum(kernel_device_ms(fn).values())


def measure_shape(shape, gated: bool) -> list[dict]:
    from gatedfwa.ops.window_attention import gluon_forward

    batch, seqlen, q_heads, kv_heads, head_dim, window = shape
    q, k, v, g = make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, gate=gated)
    scale = head_dim**-0.5
    sums = chunk_gate_sums(g, launch.gate_chunk(head_dim, q.device)) if gated else None
    name = _shape_name(*shape)
    pairs = window_pairs([seqlen] * batch, window)
    reason = gluon_forward.unsupported_reason(q, k, v, sums, None, None, launch.gate_chunk(head_dim, q.device))
    if reason is not None:
        return [{"shape": name, "gate": gated, "kernel": "gluon", "error": f"not supported: {reason}"}]

    problem = launch.Problem(q, k, window, None)
    o_gluon = torch.empty_like(q)
    lse_gluon = q.new_empty((batch, q_heads, seqlen), dtype=torch.float32)

    def run_gluon():
        gluon_forward.gluon_attention_forward(q, k, v, sums, problem.window, scale, launch.gate_chunk(head_dim, q.device),
                                              o_gluon, lse_gluon)

    def run_triton():
        return forward.attention_forward(q, k, v, sums, window, scale, None)

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run_sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=kv_heads != q_heads)

    rows = []
    run_gluon()  # compile before timing
    o_triton, lse_triton = run_triton()
    torch.cuda.synchronize()
    check = {"max |o - triton|": (o_gluon.float() - o_triton.float()).abs().max().item(),
             "max |lse - triton|": (lse_gluon - lse_triton).abs().max().item()}
    for kernel, fn, kernel_pairs in (("gluon", run_gluon, pairs), ("triton", run_triton, pairs),
                                     ("SDPA causal", run_sdpa, window_pairs([seqlen] * batch, None))):
        if kernel == "SDPA causal" and gated:
            continue  # the same row as ungated
        row = {"shape": name, "gate": gated if kernel != "SDPA causal" else "-", "kernel": kernel}
        try:
            row["ms"] = bench_ms(fn)
            row["device ms"] = _device_ms(fn)
            row["TFLOP/s"] = attention_tflops(kernel_pairs, q_heads, head_dim, row["device ms"], backward=False)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other rows
            row.update(error_record(exc))
        if kernel == "gluon":
            row.update(check)
        rows.append(row)
    triton_ms = next((r.get("device ms") for r in rows if r["kernel"] == "triton"), None)
    for row in rows:
        if triton_ms and row.get("device ms"):
            row["x of triton"] = row["device ms"] / triton_ms
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="gluon_forward")
    parser.add_argument("--shapes", type=int, nargs="*", help="indices into SHAPES (default: all)")
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    env = start_gpu_run(parser, args)
    if torch.cuda.get_device_capability()[0] != 9:
        parser.error("the Gluon kernel runs on Hopper GPUs (compute capability 9) only")
    # The Triton rows must run the Triton kernel whatever the caller's environment says.
    os.environ[HOPPER_KERNELS.name] = "triton"
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    rows = []
    for shape in shapes:
        for gated in (True, False):
            shape_rows = measure_shape(shape, gated)
            for row in shape_rows:
                print({key: row.get(key) for key in COLUMNS + ["error"] if key in row}, flush=True)
            rows.extend(shape_rows)
            write_results(args.out, args.name, {"environment": env, "shapes": shapes, "rows": rows}, rows, COLUMNS)


if __name__ == "__main__":
    main()
