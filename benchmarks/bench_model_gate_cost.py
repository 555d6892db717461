"""What the gate costs a whole model in training: the gpu-125m preset as `gatedfwa` and as
`swa` (the same model without the gate), eager and torch.compile'd, in one run.

    python benchmarks/bench_model_gate_cost.py --out benchmarks/results    # GPU, 3-4 minutes
    python benchmarks/bench_model_gate_cost.py --quick --out /tmp/cost     # CPU logic check, ~3 min

A training step is what `gatedfwa train` runs per micro-batch: bf16 autocast forward with
the loss, backward, AdamW step (float32 weights). For each mode (eager, compiled) both models
are built from the same seed, warmed up (compiled: until compilation is done), then timed in
interleaved rounds (gated, swa, gated, swa, ...: drifts of clock and temperature hit both);
reported: tokens/s of each (median over rounds) and the median of the per-round ratios
gated / swa, with its range.

The breakdown (torch.profiler, CUDA kernels of a few steps): device ms per step of each part,
both kinds, and the difference, which is what the gate adds: the attention kernels (forward,
dq, dk/dv, delta), the gate's own kernels (chunk sums, gate backward, dg's assembly),
GEMMs, and all other kernels (elementwise, norms, optimizer; compiled: Inductor's fused
kernels). Graph breaks counts torch._dynamo's graph breaks in the compiled models (0 expected).

Writes model_gate_cost.json/.md under --out. GATEDFWA_COMMIT names the commit measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import environment, error_record, write_results  # noqa: E402

from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM  # noqa: E402
from gatedfwa.train.presets import get_preset  # noqa: E402

KINDS = ("gatedfwa", "swa")

# Kernel name -> part of the breakdown; the first pattern found in the name wins.
PARTS = (
    ("attention forward", ("_forward_kernel",)),
    ("attention dq", ("_dq_kernel",)),
    ("attention dk/dv", ("_dkdv_kernel",)),
    ("attention delta", ("_delta_kernel",)),
    ("gate chunk sums", ("_chunk_sums_kernel",)),
    ("gate backward", ("_gate_backward_kernel", "_gate_forward_kernel")),
    ("dg assembly", ("_reverse_cumsum_kernel", "_gate_gradient_kernel")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm100_", "cublas", "matmul")),
)


def part_of(kernel_name: str) -> str:
    lowered = kernel_name.lower()
    for part, patterns in PARTS:
        if any(p.lower() in lowered for p in patterns):
            return part
    return "other"


def build(kind: str, quick: bool, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    fields = dict(get_preset("gpu-125m")["model"])
    if quick:  # a few-second CPU model with the same structure
        fields.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=16, window_size=16)
    fields.update(attention_kinds=kind, vocab_size=256)
    torch.manual_seed(0)
    model = GatedFWAForCausalLM(GatedFWAConfig(**fields)).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=6e-4)
    return model, optimizer


def make_step(model, optimizer, rows: torch.Tensor, compiled: bool):
    """One training step on rows [B, T] (as the trainer runs a micro-batch)."""
    network = torch.compile(model) if compiled else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=rows.is_cuda)

    def step():
        with autocast:
            loss = network(rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps: int, device: str) -> float:
    """Seconds per step over `steps` steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def kernel_breakdown(step, steps: int) -> dict[str, float]:
    """Device ms per step of each part (PARTS), from the CUDA kernels of `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    parts: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if not total_us or event.key.startswith(("cudaLaunch", "cuLaunch", "Memcpy", "Memset")):
            continue
        ms = total_us / steps / 1000
        kernels[event.key] = ms
        parts[part_of(event.key)] = parts.get(part_of(event.key), 0.0) + ms
    parts["all kernels"] = sum(v for k, v in parts.items())
    return {"parts": parts, "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:25])}


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def measure_mode(mode: str, args, device: str) -> dict:
    compiled = mode == "compiled"
    tokens = args.micro_batch * args.seq_len
    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 256, (args.micro_batch, args.seq_len), generator=generator).to(device)
    steps, models, result = {}, {}, {"mode": mode, "tokens_per_step": tokens}
    if compiled:
        from torch import _dynamo

        _dynamo.reset()
    breaks_before = graph_breaks() if compiled else 0
    for kind in KINDS:
        model, optimizer = build(kind, args.quick, device)
        models[kind] = (model, optimizer)
        steps[kind] = make_step(model, optimizer, rows, compiled)
        start = time.perf_counter()
        for _ in range(args.warmup):
            steps[kind]()
        sync(device)
        result[f"{kind}_warmup_s"] = time.perf_counter() - start
    if compiled:
        result["graph_breaks"] = graph_breaks() - breaks_before
    per_round = {kind: [] for kind in KINDS}
    ratios = []
    for _ in range(args.rounds):
        for kind in KINDS:
            per_round[kind].append(tokens / time_steps(steps[kind], args.steps, device))
        ratios.append(per_round["gatedfwa"][-1] / per_round["swa"][-1])
    for kind in KINDS:
        result[f"{kind}_tokens_per_s"] = statistics.median(per_round[kind])
        result[f"{kind}_rounds"] = per_round[kind]
    result["ratio"] = statistics.median(ratios)
    result["ratio_range"] = [min(ratios), max(ratios)]
    if device == "cuda":
        breakdown = {kind: kernel_breakdown(steps[kind], args.profile_steps) for kind in KINDS}
        result["breakdown"] = breakdown
        names = sorted(set(breakdown["gatedfwa"]["parts"]) | set(breakdown["swa"]["parts"]))
        result["gate_adds_ms"] = {
            name: breakdown["gatedfwa"]["parts"].get(name, 0.0) - breakdown["swa"]["parts"].get(name, 0.0)
            for name in names
        }
    del models, steps
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: a logic check, no timings kept")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per step (the preset's micro_batch_size)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=3)
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args, strict=not args.quick)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        args.micro_batch, args.seq_len, args.warmup, args.steps, args.rounds = 2, 64, 1, 1, 2
    name = "model_gate_cost_quick" if args.quick else "model_gate_cost"

    payload = {"environment": environment(), "preset": "gpu-125m", "quick": args.quick,
               "micro_batch": args.micro_batch, "seq_len": args.seq_len, "modes": {}}
    rows = []
    for mode in args.modes.split(","):
        try:
            result = measure_mode(mode, args, device)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other mode
            result = {"mode": mode, **error_record(exc)}
        payload["modes"][mode] = result
        print(mode, {k: v for k, v in result.items() if not isinstance(v, (dict, list))}, flush=True)
        rows.append({key: value for key, value in {
            "mode": mode, "part": "tokens/s (whole step)",
            "gatedfwa": result.get("gatedfwa_tokens_per_s"), "swa": result.get("swa_tokens_per_s"),
            "gated / swa": result.get("ratio"),
            "note": (f"ratio range {result['ratio_range'][0]:.3f}-{result['ratio_range'][1]:.3f}"
                     if "ratio_range" in result else "")
                    + (f"; graph breaks {result['graph_breaks']}" if "graph_breaks" in result else ""),
            "error": result.get("error", ""),
        }.items() if value is not None})
        for part, added in sorted(result.get("gate_adds_ms", {}).items(), key=lambda kv: -abs(kv[1])):
            parts = {kind: result["breakdown"][kind]["parts"].get(part, 0.0) for kind in KINDS}
            rows.append({"mode": mode, "part": f"{part} ms/step", "gatedfwa": parts["gatedfwa"], "swa": parts["swa"],
                         "gate adds ms": added})
        # Written after each mode, so that a run stopped during the next keeps this one.
        write_results(args.out, name, payload, rows,
                      ["mode", "part", "gatedfwa", "swa", "gated / swa", "gate adds ms", "note", "error"])


if __name__ == "__main__":
    main()
