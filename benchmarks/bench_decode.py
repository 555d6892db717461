"""Decode attention step against a full window cache, on a GPU: time per step and how close
the kernel comes to the device's copy bandwidth.

    python benchmarks/bench_decode.py --out benchmarks/results          # GPU, about a minute
    python benchmarks/bench_decode.py --quick --out /tmp/decode          # CPU logic check, no timing

A decode step is memory-bound: it reads every cached key and value once (plus the decays,
the slot positions and q). Bytes read / time, compared with a device-to-device copy measured
in the same run (copy GB/s counts bytes read + written), says how well the kernel streams.
Each variant reports read_GBps, the copy's copy_GBps (a 1 GiB copy) and pct_of_copy. At batch
1 the window (17 MB) is small enough that a copy of that size does not reach the 1 GiB copy's
rate either: b1 also reports same_size_copy_GBps, a copy of its bytes_read timed like the
kernel (CUDA graph, cycling through buffers beyond the L2), and pct_of_same_size_copy.
The kernel is one launch at every batch size (splits merged by the last split program);
splits is the split count it launches (decode_config, rounded to whole tiles).

Variants (bf16, HQ=32, H=8, D=128, gated, cache full, L=1 unless named):
    main        B=64, w=4096   (the target: >= 70% of copy bandwidth)
    w1024/w2048 B=64
    b1/b8       w=4096         (flash-decoding splits keep the GPU busy; b1 target: >= 60% of copy)
    L4          B=64, w=4096, 4 new tokens (speculative decoding)
    nogate      B=64, w=4096, g=None
Timings per variant (medians of CUDA-event timings after warm-up):
    kernel_ms         attention kernel(s) alone, CUDA graph (no launch overhead), cycling
                      through cache copies that together exceed the L2 cache
    kernel_update_ms  the same with the in-kernel decay update (what a step runs)
    step_ms           the whole op decode_gated_window_attention (kernel + cache append,
                      Python included), plain launches (triton.testing.do_bench)
    sdpa_ms           peer: torch SDPA of q against the same K/V caches, no gate, no window
                      mask (enable_gqa), CUDA graph like kernel_ms
Each variant also checks its output against the PyTorch decode path on two batch rows.

Writes decode.json/.md (decode_quick.* with --quick) and decode_sweep.json/.md (tile
sweep of the main and b1 variants; b1 over tiles, stages and 4-64 splits) under --out; the
b1 line (GB/s and % of both copies) is printed at the end. Every variant runs in its own try block: an error is
recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

QUICK = "--quick" in sys.argv
if QUICK and not torch.cuda.is_available():
    # The logic check runs the Triton kernel through the interpreter when there is no GPU;
    # that must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import bench_ms, environment, error_record, measure_ceilings, write_results  # noqa: E402

from gatedfwa.ops.decode import WindowLayerCache, decode_gated_window_attention  # noqa: E402
from gatedfwa.ops.decode.kernels import decode_attention_triton  # noqa: E402
from gatedfwa.ops.decode.launch import decode_config, split_slots  # noqa: E402
from gatedfwa.ops.decode.torch_path import decode_attention_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TIMING = DEVICE == "cuda" and not QUICK

FULL_VARIANTS = {
    "main": dict(batch=64, window=4096),
    "w1024": dict(batch=64, window=1024),
    "w2048": dict(batch=64, window=2048),
    "b1": dict(batch=1, window=4096),
    "b8": dict(batch=8, window=4096),
    "L4": dict(batch=64, window=4096, length=4),
    "nogate": dict(batch=64, window=4096, gated=False),
}
QUICK_VARIANTS = {
    "main": dict(batch=3, window=40, q_heads=4, kv_heads=2, head_dim=24),
    "L4": dict(batch=2, window=40, q_heads=4, kv_heads=2, head_dim=24, length=4),
    "nogate": dict(batch=2, window=40, q_heads=4, kv_heads=2, head_dim=24, gated=False),
    "split": dict(batch=1, window=300, q_heads=4, kv_heads=1, head_dim=16),
}
DEFAULTS = dict(batch=64, window=4096, q_heads=32, kv_heads=8, head_dim=128, length=1, gated=True,
                dtype=torch.bfloat16)


L2_FLUSH_BYTES = 256 * 2**20


def graph_ms(calls, min_ms: float = 2.0, repeats: int = 25) -> float:
    """Median milliseconds per call of a CUDA graph that runs ``calls`` in order (repeated
    until the graph takes about ``min_ms``): kernel time without launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compile and warm up outside the capture
            call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        torch.cuda.synchronize()
        rounds = max(1, min(64, int(min_ms / max(start.elapsed_time(end), 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(rounds):
                for call in calls:
                    call()
        times = []
        for _ in range(repeats):
            start.record(stream)
            graph.replay()
            end.record(stream)
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / (rounds * len(calls)))
    del graph
    return sorted(times)[len(times) // 2]


def same_size_copy_gbps(nbytes: int) -> float:
    """GB/s (bytes read + written) of a device-to-device copy of ``nbytes`` bytes, timed like
    kernel_ms: a CUDA graph cycling through enough buffer pairs to exceed the L2 cache."""
    pairs = max(1, min(32, -(-L2_FLUSH_BYTES // nbytes)))
    buffers = [(torch.empty(nbytes, dtype=torch.uint8, device=DEVICE), torch.empty(nbytes, dtype=torch.uint8,
                                                                                 device=DEVICE)) for _ in range(pairs)]
    ms = graph_ms([lambda src=src, dst=dst: dst.copy_(src) for src, dst in buffers])
    return 2 * nbytes / ms / 1e6


def full_cache(batch, window, q_heads, kv_heads, head_dim, gated, dtype, **_) -> WindowLayerCache:
    """A ring that has seen 10 windows of tokens: every slot valid, decays of a plausible size
    (sums of up to w gates of about -0.01)."""
    cache = WindowLayerCache(window)
    cache.allocate(batch, kv_heads, q_heads, head_dim, dtype, DEVICE, gated)
    cache.keys.normal_()
    cache.values.normal_()
    seen = 10 * window
    tokens = torch.arange(seen - window, seen, device=DEVICE)
    cache.positions.index_copy_(1, tokens % window, tokens.expand(batch, window).contiguous())
    if gated:
        age = (seen - 1 - tokens).float()  # tokens after each slot's token
        cache.decays.index_copy_(2, tokens % window, (-0.01 * age * (1 + 0.1 * torch.rand(batch, q_heads, window,
                                                                                              device=DEVICE))))
    cache.seen_tokens = seen
    cache.token_counts.fill_(seen)
    return cache


def new_tokens(batch, q_heads, kv_heads, head_dim, length, gated, dtype, **_):
    q = torch.randn(batch, length, q_heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, length, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, length, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    g = -0.05 * torch.rand(batch, length, q_heads, device=DEVICE) if gated else None
    return q, k, v, g


def rows_of(cache: WindowLayerCache, rows: int) -> WindowLayerCache:
    """A copy of the first `rows` batch rows (for the reference check)."""
    sub = WindowLayerCache(cache.window_size)
    sub.allocate(rows, cache.num_kv_heads, cache.num_q_heads, cache.head_dim, cache.keys.dtype, DEVICE, cache.gated)
    for name, tensor in cache.tensors().items():
        getattr(sub, name).copy_(tensor[:rows])
    sub.seen_tokens = cache.seen_tokens
    return sub


def bytes_read(cfg) -> int:
    """K + V cache, decays, slot positions, q (k_new/v_new/g_new are negligible)."""
    b, w, hq, h, d, n = cfg["batch"], cfg["window"], cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"], cfg["length"]
    item = torch.tensor([], dtype=cfg["dtype"]).element_size()
    total = 2 * b * h * w * d * item + b * w * 8 + b * n * hq * d * item
    if cfg["gated"]:
        total += b * hq * w * 4
    return total


def run_variant(name: str, overrides: dict, copy_gbps: float | None) -> dict:
    cfg = {**DEFAULTS, **overrides}
    cfg["dtype"] = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    record = {"variant": name, **{k: (str(v) if k == "dtype" else v) for k, v in cfg.items()}}
    cache = full_cache(**cfg)
    q, k, v, g = new_tokens(**cfg)
    scale = cfg["head_dim"] ** -0.5
    config = decode_config(cfg["batch"], cfg["kv_heads"], cfg["q_heads"] // cfg["kv_heads"], cfg["length"],
                           cfg["head_dim"], cache.slots_in_use, q.device, q.element_size())
    if name == "split":
        config["num_splits"] = 3
    record.update(config=config, splits=split_slots(cache.slots_in_use, config["num_splits"], config["block_n"])[1],
                  cache_bytes=cache.memory_bytes(), bytes_read=bytes_read(cfg))

    # Correctness on two rows against the PyTorch decode path (float32 math).
    rows = min(2, cfg["batch"])
    sub = rows_of(cache, rows)
    sub_g = None if g is None else g[:rows]
    expected = decode_attention_torch(q[:rows], k[:rows], v[:rows], sub_g, sub, scale)
    got = decode_attention_triton(q[:rows], k[:rows], v[:rows], sub_g, sub, scale, num_splits=config["num_splits"])
    record["max_abs_error_vs_torch"] = (got.float() - expected.float()).abs().max().item()
    del sub, expected, got

    def kernel(update=False, cache=cache):
        return decode_attention_triton(q, k, v, g, cache, scale, update_decays=update, **config)

    if not TIMING:
        kernel()
        decode_gated_window_attention(q, k, v, g, cache)
        return record
    # Enough cache copies that one graph cycles through more bytes than the L2 holds: a
    # model's layers each have their own cache, so a step never finds its cache in L2.
    copies = [cache] + [full_cache(**cfg) for _ in range(min(31, -(-L2_FLUSH_BYTES // cache.memory_bytes()) - 1))]
    record["cache_copies"] = len(copies)
    record["kernel_ms"] = graph_ms([lambda c=c: kernel(False, c) for c in copies])
    record["kernel_update_ms"] = graph_ms([lambda c=c: kernel(True, c) for c in copies])
    try:
        q_sdpa = q.transpose(1, 2)
        record["sdpa_ms"] = graph_ms([lambda c=c: F.scaled_dot_product_attention(
            q_sdpa, c.keys, c.values, scale=scale, enable_gqa=True) for c in copies])
    except Exception as exc:  # the peer is optional; ours is what is measured
        record["sdpa_error"] = f"{type(exc).__name__}: {exc}"
    del copies[1:]
    record["step_ms"] = bench_ms(lambda: decode_gated_window_attention(q, k, v, g, cache))
    record["read_GBps"] = record["bytes_read"] / record["kernel_ms"] / 1e6
    # With the decay update the kernel also writes the decays back.
    written = cfg["batch"] * cfg["q_heads"] * cfg["window"] * 4 if cfg["gated"] else 0
    record["update_GBps"] = (record["bytes_read"] + written) / record["kernel_update_ms"] / 1e6
    if copy_gbps:
        record["copy_GBps"] = copy_gbps
        record["pct_of_copy"] = 100 * record["read_GBps"] / copy_gbps
        record["update_pct_of_copy"] = 100 * record["update_GBps"] / copy_gbps
    if cfg["batch"] == 1:
        record["same_size_copy_GBps"] = same_size_copy_gbps(record["bytes_read"])
        record["pct_of_same_size_copy"] = 100 * record["read_GBps"] / record["same_size_copy_GBps"]
    bytes_before = cache.memory_bytes()
    for _ in range(3 * cfg["window"] // 1024 + 3):
        decode_gated_window_attention(q, k, v, g, cache)
    record["cache_bytes_constant"] = cache.memory_bytes() == bytes_before
    return record


def tile_sweep(copy_gbps: float | None, variant: str = "main") -> list[dict]:
    """Kernel time of a variant for a grid of tile configurations: "main" (B=64) over tiles,
    stages and 1-2 splits, "b1" (B=1, flash-decoding) over tiles, stages and 4-64 splits
    asked (splits: launched, whole tiles per split)."""
    cfg = {**DEFAULTS, **FULL_VARIANTS[variant]}
    cache = full_cache(**cfg)
    q, k, v, g = new_tokens(**cfg)
    scale = cfg["head_dim"] ** -0.5
    rows = []
    splits = (1, 2) if variant == "main" else (4, 8, 16, 32, 64)
    stages = (2, 3, 4) if variant == "main" else (2, 3)
    for block_n in (32, 64, 128):
        for num_warps in (4, 8):
            for num_stages in stages:
                for num_splits in splits:
                    row = dict(variant=variant, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                               num_splits=num_splits)
                    launched = split_slots(cache.slots_in_use, num_splits, block_n)[1]
                    try:
                        ms = graph_ms([lambda: decode_attention_triton(q, k, v, g, cache, scale,
                                                                       update_decays=True, **row)])
                        row["kernel_update_ms"] = ms
                        row["read_GBps"] = bytes_read(cfg) / ms / 1e6
                        if copy_gbps:
                            row["pct_of_copy"] = 100 * row["read_GBps"] / copy_gbps
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {exc}"
                    rows.append({**row, "splits": launched})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="tiny CPU logic check, no timing")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep")
    parser.add_argument("--sweep", default="main,b1", help="variants whose tiles are swept (main, b1; default both)")
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args, strict=not args.quick)

    env = environment()
    copy_gbps = None
    if TIMING:
        try:
            env.update(measure_ceilings())
            copy_gbps = env["copy_GBps"]
        except Exception as exc:
            env["ceilings_error"] = f"{type(exc).__name__}: {exc}"
    variants = QUICK_VARIANTS if QUICK else FULL_VARIANTS
    results = []
    for name, overrides in variants.items():
        try:
            record = run_variant(name, overrides, copy_gbps)
        except Exception as exc:
            record = {"variant": name, **overrides, **error_record(exc)}
        results.append(record)
        print({k: v for k, v in record.items() if k != "traceback"}, flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    suffix = "_quick" if QUICK else ""
    payload = {"environment": env, "device": DEVICE, "variants": results,
               "note": "bytes_read = K+V cache + decays + positions + q; pct_of_copy = read GB/s of the "
                       "kernel (CUDA graph) / device-to-device copy GB/s (read + written) of the same run"}
    columns = ["variant", "batch", "window", "length", "gated", "splits", "kernel_ms", "kernel_update_ms", "step_ms",
               "sdpa_ms", "read_GBps", "copy_GBps", "pct_of_copy", "update_pct_of_copy", "same_size_copy_GBps",
               "pct_of_same_size_copy", "max_abs_error_vs_torch", "cache_bytes_constant", "error"]
    write_results(args.out, f"decode{suffix}", payload, results, columns)

    if TIMING and not args.no_sweep:
        sweep = []
        for variant in [v.strip() for v in args.sweep.split(",") if v.strip()]:
            try:
                sweep += tile_sweep(copy_gbps, variant)
            except Exception as exc:
                sweep.append({"variant": variant, **error_record(exc)})
        write_results(args.out, "decode_sweep", {"environment": env, "sweep": sweep}, sweep,
                      ["variant", "block_n", "num_warps", "num_stages", "num_splits", "splits", "kernel_update_ms",
                       "read_GBps", "pct_of_copy", "error"])
    for r in results:
        if r.get("batch") == 1 and "read_GBps" in r:
            print(f"{r['variant']} (batch 1, {r['splits']} splits, one launch): {r['read_GBps']:.0f} GB/s read = "
                  f"{r.get('pct_of_copy', float('nan')):.1f}% of copy ({r.get('copy_GBps', float('nan')):.0f} GB/s), "
                  f"{r['pct_of_same_size_copy']:.1f}% of a same-size copy ({r['same_size_copy_GBps']:.0f} GB/s)")
    failed = [r["variant"] for r in results if "error" in r]
    print(f"wrote {args.out}/decode{suffix}.json" + (f"; failed: {failed}" if failed else ""))


if __name__ == "__main__":
    main()
