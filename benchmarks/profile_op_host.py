"""Host cost of one training call of the attention ops: microseconds of Python, dispatch and
launch work per forward, and per forward+backward, with and without the gate.

A step whose kernels take ~2 ms (B=4, T=8192, w=512 on an H200) leaves the GPU idle whenever
the host needs longer than that to issue the step, and a timing of the step then measures
the host. This script isolates the host side. It calls each op on tiny tensors, so that the
device work is negligible, and reports the wall time per call (the best of --repeats runs;
the median is in the JSON):

* attention g=None, attention with g [B, T, HQ] (gate sums from g), and the fused op from
  the gate projection (gate_attention), each forward only and forward+backward;
* Triton launches per call.

    python benchmarks/profile_op_host.py --stub-kernels          # any machine, Triton installed
    python benchmarks/profile_op_host.py --out benchmarks/results # CUDA: the real launches

``--stub-kernels`` (for a machine without a GPU) forces the Triton backend on CPU tensors and
replaces every Triton kernel of gatedfwa.ops by a counter that does nothing
(profile_decode_host.stub_triton_kernels): outputs are garbage, the Python and aten work
around the launches is real, the launch cost itself is not included. On CUDA the loop runs
without synchronising until its end, so its wall time is the host's while the tiny kernels
keep up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import environment, write_results  # noqa: E402
from profile_decode_host import LaunchCounter, stub_triton_kernels  # noqa: E402


def make_calls(device: str, batch: int, seqlen: int, heads: int, head_dim: int, window: int) -> dict:
    """name -> zero-argument callable, each one training call of an op."""
    from gatedfwa import gated_window_attention
    from gatedfwa.ops.window_attention.fused_gate import _fused_gate_attention as fused_gate_attention

    def leaf(*shape):
        return torch.randn(*shape, device=device).requires_grad_()

    q, k, v = leaf(batch, seqlen, heads, head_dim), leaf(batch, seqlen, heads, head_dim), leaf(batch, seqlen, heads, head_dim)
    do = torch.randn(batch, seqlen, heads, head_dim, device=device)
    g = F.logsigmoid(torch.randn(batch, seqlen, heads, device=device) + 3).requires_grad_()
    gate_pre = leaf(batch, seqlen, 2 * heads)
    bias = leaf(heads)
    scale = head_dim**-0.5

    def attend(gate):
        return gated_window_attention(q, k, v, gate, window_size=window)

    def fused():
        return fused_gate_attention(q, k, v, gate_pre, bias, window, scale, None)[0]

    return {
        "attention g=None, forward": lambda: attend(None),
        "attention g=None, forward+backward": lambda: attend(None).backward(do),
        "attention with g, forward": lambda: attend(g),
        "attention with g, forward+backward": lambda: attend(g).backward(do),
        "fused gate + attention, forward": fused,
        "fused gate + attention, forward+backward": lambda: fused().backward(do),
    }


def time_call(call, calls: int, repeats: int, device: str) -> list[float]:
    """Microseconds per call of `calls` back-to-back calls, once per repeat."""
    for _ in range(5):
        call()
    runs = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for op_host.json/.md (default: print only)")
    parser.add_argument("--stub-kernels", action="store_true", help="CPU: Triton path with launches stubbed out")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args, strict=args.out is not None)
    if args.stub_kernels:
        stub_triton_kernels()
        device = "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = dict(batch=1, seqlen=128, heads=2, head_dim=64, window=64)
    rows = []
    for name, call in make_calls(device, **sizes).items():
        LaunchCounter.launches = 0
        call()
        launches = LaunchCounter.launches if args.stub_kernels else None
        runs = time_call(call, args.calls, args.repeats, device)
        row = {"call": name, "host us": min(runs), "median us": statistics.median(runs)}
        if launches is not None:
            row["Triton launches"] = launches
        rows.append(row)
        print(f"{name:45s} {min(runs):8.1f} us" + (f"  ({launches} launches)" if launches is not None else ""),
              flush=True)
    if args.out:
        env = environment()
        env["mode"] = "stubbed Triton launches on CPU tensors" if args.stub_kernels else f"{device}, real launches"
        payload = {"environment": env, "sizes": sizes, "rows": rows}
        write_results(args.out, "op_host", payload, rows, ["call", "host us", "median us", "Triton launches"])


if __name__ == "__main__":
    main()
