"""Where the time of one forward+backward of gated window attention goes, kernel by kernel,
on a GPU: device time per step of every Triton kernel (torch.profiler), and the whole step
(do_bench), for three variants:

  gated, from g                        gated_window_attention with log gates g
  gated, from the gate projection      gated_fwa_attention: the gate computed from x inside
                                       the op (its step includes the projection's GEMMs,
                                       which are not Triton kernels and get no row)
  no gate                              gated_window_attention with g=None

    python benchmarks/profile_attention_kernels.py --out DIR

Writes attention_profile.json/.md (no copy is kept in benchmarks/results/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from attention_inputs import DEVICE, make_inputs  # noqa: E402
from common import bench_ms, start_gpu_run, write_results  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402
from gatedfwa.ops import gated_fwa_attention  # noqa: E402

VARIANTS = ("gated, from g", "gated, from the gate projection", "no gate")


def profile_kernels(batch=4, seqlen=8192, heads=16, head_dim=128, window=2048, steps=10):
    """Rows {variant, kernel, calls, ms per step} for each Triton kernel (names starting with
    "_"), then one row per variant with the whole step's do_bench time."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name in VARIANTS:
        q, k, v, g = make_inputs(batch, seqlen, heads, heads, head_dim, gate=name == "gated, from g",
                                 requires_grad=True)
        do = torch.randn_like(q)
        width = heads * head_dim
        # The gate's pre-activations x @ W^T come out N(0, 1), as the log gates' inputs of make_inputs.
        x = torch.randn(batch, seqlen, width, device=DEVICE, dtype=q.dtype, requires_grad=True)
        gate_weight = (torch.randn(2 * heads, width, device=DEVICE) * width**-0.5).to(q.dtype).requires_grad_()
        gate_bias = torch.full((heads,), 3.0, device=DEVICE, dtype=q.dtype, requires_grad=True)

        def step():
            if name == "gated, from the gate projection":
                o = gated_fwa_attention(q, k, v, x, gate_weight, gate_bias, window_size=window)
            else:
                o = gated_window_attention(q, k, v, g, window_size=window)
            o.backward(do)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        for event in prof.key_averages():
            total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if total_us and event.key.startswith("_"):
                rows.append({"variant": name, "kernel": event.key[:60], "calls": event.count // steps,
                             "ms per step": total_us / steps / 1000})
                print(rows[-1], flush=True)
        leaves = [t for t in (q, k, v, g, x, gate_weight, gate_bias) if t is not None]
        rows.append({"variant": name, "kernel": "fwd+bwd (do_bench)", "ms per step": bench_ms(step, grad_to_none=leaves)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    env = start_gpu_run(parser, args)
    rows = profile_kernels()
    write_results(args.out, "attention_profile", {"environment": env, "rows": rows}, rows,
                  ["variant", "kernel", "calls", "ms per step"])


if __name__ == "__main__":
    main()
