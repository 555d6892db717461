"""Shared pieces of the benchmark scripts: environment record, ceilings, timing, FLOP
counting and result files (JSON + markdown table under benchmarks/results/)."""

from __future__ import annotations

import datetime
import json
import platform
import traceback
from pathlib import Path

import torch

import provenance

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The commit being measured (provenance.py: git's HEAD, or GATEDFWA_COMMIT where there
    is no git; a tree with uncommitted changes is refused unless allowed)."""
    return provenance.recorded()["git_commit"]


def error_record(exc: BaseException) -> dict:
    """What a failed variant leaves in the results, so that the run goes on."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}


def environment() -> dict:
    import triton

    from gatedfwa.ops.common.tuning import architecture

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance.recorded(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), sm_count=props.multi_processor_count,
                    cuda=torch.version.cuda, arch=architecture(torch.device("cuda")))
    return info


def start_gpu_run(parser, args) -> dict:
    """The opening of a script that measures on a GPU: settles the commit it records
    (provenance.py: a dirty tree stops it unless --allow-dirty), refuses to run without a
    CUDA GPU, prints and returns environment()."""
    provenance.settle_or_exit(parser, args)
    if not torch.cuda.is_available():
        parser.error("a CUDA GPU is required")
    env = environment()
    print(env, flush=True)
    return env


def bench_ms(fn, warmup_ms: float = 50, rep_ms: float = 300, grad_to_none=None) -> float:
    """Median milliseconds of fn (CUDA events, after warm-up)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                   return_mode="median")


def kernel_device_ms(fn, iterations: int = 30) -> dict[str, float]:
    """Device time per call of each CUDA kernel that fn launches (torch.profiler, CUPTI), with
    the L2 cache flushed before every call, as do_bench does. Unlike event timing around
    fn, this leaves out launch latency and the gaps between kernels: what the kernels
    themselves take. Returns {kernel name: ms per call}; the flush's own kernel is left out."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total_us and "Fill" not in event.key and "fill" not in event.key:
            times[event.key] = total_us / iterations / 1000
    return times


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, measured now."""
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ b)
    result = {
        "copy_GBps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
        "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9,
    }
    del src, dst, a, b
    torch.cuda.empty_cache()
    return result


def window_pairs(lengths, window: int | None) -> int:
    """Number of (query, key) pairs inside the causal window over sequences of these lengths."""
    total = 0
    for n in lengths:
        w = n if window is None else min(window, n)
        total += w * (w + 1) // 2 + (n - w) * w
    return total


def attention_tflops(pairs: int, q_heads: int, head_dim: int, ms: float, backward: bool) -> float:
    """TFLOP/s over in-window pairs: forward 4 * HQ * P * D, forward+backward 3.5x that."""
    flops = 4 * q_heads * pairs * head_dim * (3.5 if backward else 1.0)
    return flops / ms / 1e9


def write_results(out_dir: str | Path, name: str, payload: dict, table_rows: list[dict], columns: list[str]) -> None:
    """Write <name>.json (everything) and <name>.md (a table of table_rows)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    env = payload.get("environment", {})
    dirty = " (dirty tree)" if env.get("dirty") else ""
    lines = [
        f"# {name}",
        "",
        f"{env.get('gpu', 'CPU')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"commit {str(env.get('git_commit'))[:10]}{dirty}, {env.get('date')}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in table_rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
