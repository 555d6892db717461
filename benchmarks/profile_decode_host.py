"""Host cost of one decode step of the language model: microseconds per step and torch ops
per step, for each attention kind.

At batch 1 a decode step of a small or mid-sized model is bound by the host: Python code,
op dispatch and kernel launches, not by the GPU's work. This script isolates that cost. A
tiny model (default 12 layers, hidden 64, 4 heads, window 16) reads a prompt, then runs
``model(next_ids, cache=cache, logits_to_keep=1)`` greedily, keeping the next token on the
device (no host synchronisation inside the loop). It reports per kind:

* host us/step: wall time of the loop divided by the steps, the best of --repeats runs
  (the least disturbed by other processes; the median is in the JSON). On the CPU with
  tiny tensors this approximates the host overhead. On CUDA the loop runs ahead of the GPU
  until the launch queue fills; with tiny tensors the GPU work is small, so this too is the
  host cost (the script synchronises only after the loop).
* ops/step: aten ops dispatched per step (a TorchDispatchMode counts them), Triton kernel
  launches not included (they do not go through the dispatcher); compute ops/step: the
  same without the ops that only make views (no kernel on a GPU).
* syncs/step: ops that copy a device value to the host (``.item()``, ``bool(tensor)``,
  ``nonzero``, ``.tolist()``, ``.cpu()``); must be 0.
* the most frequent ops of one step (``--top``), to see where the count comes from.

    python benchmarks/profile_decode_host.py                       # CPU (the PyTorch decode path)
    python benchmarks/profile_decode_host.py --out benchmarks/results   # also writes JSON + table

On the CPU the decode attention takes the PyTorch reference path; on CUDA the Triton
kernels. ``--stub-kernels`` measures the host side of the Triton path on a CPU: the backend
is forced to Triton and every Triton kernel launch of gatedfwa.ops is replaced by a counter
that does nothing (outputs are garbage, the Python and aten work around the launches is
real). It reports launches/step beside the ops; the launch cost itself is not included.

    python benchmarks/profile_decode_host.py --stub-kernels         # CPU: host side of the GPU path
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM  # noqa: E402

KINDS = ("gatedfwa", "swa", "full", "forgetting")

# What a device-to-host read dispatches to: .item() / bool() / int() end in
# _local_scalar_dense (is_nonzero and item on the way), nonzero must size its output from
# device data, and .cpu() / .tolist() copy to the CPU.
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
                 "aten::nonzero_static", "aten::masked_select"}


# Ops that only describe a view of existing memory: no kernel is launched for them.
VIEW_OPS = {"aten::view", "aten::_unsafe_view", "aten::t", "aten::transpose", "aten::slice", "aten::alias",
            "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::select", "aten::permute",
            "aten::as_strided", "aten::detach", "aten::_reshape_alias", "aten::split", "aten::unbind"}


class LaunchCounter:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` counts and does nothing."""

    launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        LaunchCounter.launches += 1


def stub_triton_kernels() -> None:
    """Replace every Triton kernel of the gatedfwa.ops modules by a LaunchCounter and force
    the Triton backend (for --stub-kernels on a machine without a GPU)."""
    import os

    from triton.runtime import KernelInterface

    from gatedfwa.testing import op_modules

    os.environ["GATEDFWA_BACKEND"] = "triton"
    modules = op_modules()
    for module in modules:
        for attr, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                setattr(module, attr, LaunchCounter())


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name (overload dropped); also counts copies from another device to
    the CPU, which are host synchronisations too."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.counts[name] += 1
        if name in HOST_SYNC_OPS:
            self.syncs[name] += 1
        out = func(*args, **kwargs)
        if name in ("aten::_to_copy", "aten::copy_") and _device_to_host(args, kwargs, out):
            self.syncs[name + " (to cpu)"] += 1
        return out


def _device_to_host(args, kwargs, out) -> bool:
    """Whether _to_copy(src) -> out or copy_(dst, src) moved data from a device to the CPU."""
    if len(args) >= 2 and isinstance(args[1], torch.Tensor):  # copy_(dst, src)
        src, dst = args[1], args[0]
    else:  # _to_copy(src, ...)
        src, dst = args[0], out
    return src.device.type != "cpu" and dst.device.type == "cpu"


def tiny_config(kind: str, layers: int, hidden: int, heads: int, kv_heads: int, window: int,
                token_shift: bool, output_gate: bool) -> GatedFWAConfig:
    windowed = kind in ("gatedfwa", "swa")
    return GatedFWAConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          head_dim=hidden // heads, attention_kinds=kind, window_size=window if windowed else None,
                          token_shift=token_shift, output_gate=output_gate)


@torch.no_grad()
def profile_kind(kind: str, args, device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    config = tiny_config(kind, args.layers, args.hidden, args.heads, args.kv_heads, args.window,
                         args.token_shift, args.output_gate)
    model = GatedFWAForCausalLM(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt), device=device)

    def prefill():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(cache, next_ids, steps):
        for _ in range(steps):
            out = model(next_ids, cache=cache, logits_to_keep=1)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        return next_ids

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    # Warm-up (kernel compilation, allocator, first-call paths).
    cache, next_ids = prefill()
    decode(cache, next_ids, args.warmup)

    # Ops of one step, after a few steps (the unbounded caches' growth is not in the step).
    counter = OpCounter()
    cache, next_ids = prefill()
    next_ids = decode(cache, next_ids, 3)
    launches_before = LaunchCounter.launches
    with counter:
        decode(cache, next_ids, 1)
    launches = LaunchCounter.launches - launches_before

    per_step_us = []
    for _ in range(args.repeats):
        cache, next_ids = prefill()
        synchronize()
        start = time.perf_counter()
        decode(cache, next_ids, args.steps)
        synchronize()
        per_step_us.append((time.perf_counter() - start) / args.steps * 1e6)
    return {
        "kind": kind,
        "host_us_per_step": min(per_step_us),
        "host_us_per_step_median": statistics.median(per_step_us),
        "ops_per_step": sum(counter.counts.values()),
        "compute_ops_per_step": sum(n for name, n in counter.counts.items() if name not in VIEW_OPS),
        "syncs_per_step": sum(counter.syncs.values()),
        "stubbed_launches_per_step": launches if args.stub_kernels else None,
        "sync_ops": dict(counter.syncs),
        "top_ops": counter.counts.most_common(args.top),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--token-shift", action="store_true")
    parser.add_argument("--output-gate", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="most frequent ops of one step to print")
    parser.add_argument("--stub-kernels", action="store_true",
                        help="CPU only: Triton path with kernel launches replaced by a counter")
    parser.add_argument("--out", default=None, help="folder for profile_decode_host.json and .md")
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args, strict=args.out is not None)

    device = args.device
    if args.stub_kernels:
        if device != "cpu":
            parser.error("--stub-kernels is for a CPU run (on CUDA the kernels run for real)")
        stub_triton_kernels()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = []
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        result = profile_kind(kind, args, device, dtype)
        results.append(result)
        print(f"{kind:>10}: {result['host_us_per_step']:9.1f} us/step  {result['ops_per_step']:5d} ops/step  "
              f"{result['compute_ops_per_step']:5d} compute ops/step  "
              f"{result['syncs_per_step']} syncs/step {result['sync_ops'] or ''}"
              + (f"  {result['stubbed_launches_per_step']} launches/step" if args.stub_kernels else ""), flush=True)
        print("            top ops: " + ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in result["top_ops"]))

    if args.out:
        from common import environment, write_results

        rows = [{"kind": r["kind"], "host us/step": r["host_us_per_step"], "ops/step": r["ops_per_step"],
                 "compute ops/step": r["compute_ops_per_step"], "syncs/step": r["syncs_per_step"], "launches/step": r["stubbed_launches_per_step"] or "-"}
                for r in results]
        config = {k: v for k, v in vars(args).items() if k not in ("out", "top")}
        payload = {"environment": environment(), "device": device, "dtype": str(dtype), "config": config,
                   "runs": results}
        write_results(args.out, "profile_decode_host", payload, rows,
                      ["kind", "host us/step", "ops/step", "compute ops/step", "syncs/step", "launches/step"])
        print(f"wrote {Path(args.out) / 'profile_decode_host'}.json and .md")


if __name__ == "__main__":
    main()
