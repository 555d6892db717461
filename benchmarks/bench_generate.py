"""Generation with a bounded window cache vs a growing full-attention cache.

A ~125M-parameter GatedFWA language model (random weights, bf16) reads a 32k-token prompt
(one parallel prefill that fills the cache) and then generates 8k tokens greedily, one
decode-op step per token. The same model with attention_kinds="full" runs beside it. For
each, the table gives the per-token latency at several points of the generated length
(median over a block of steps starting there) and the cache's memory at the start and the
end of generation.

    python benchmarks/bench_generate.py --out benchmarks/results     # H200: about 2-3 minutes
    python benchmarks/bench_generate.py --quick --out /tmp/gen        # tiny CPU run of the logic

Per-step latency comes from CUDA events recorded between steps (no host synchronisation
inside the loop: the next token stays on the device), so it is the wall time per token as
the GPU sees it, launch overhead included. Every run is in its own try block: an error is
recorded in the JSON and the next run goes on. With --quick the files are named *_quick and
hold CPU wall times of a tiny model (logic check only).

Writes bench_generate.json and bench_generate.md (GPU name, versions, commit, config).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

QUICK = "--quick" in sys.argv
if QUICK and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_results  # noqa: E402

from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not QUICK else "cpu"

FULL_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, head_dim=64, rope_theta=500000.0,
                  max_position_embeddings=65536, tie_word_embeddings=True)
QUICK_MODEL = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                   tie_word_embeddings=True)


class Clock:
    """Step timestamps: CUDA events on the GPU (no synchronisation until read), wall clock
    (after the step's work is done) on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.marks = []

    def mark(self) -> None:
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_generation(model, prompt_len: int, new_tokens: int, batch: int, checkpoints: list[int], block: int,
                   time_budget_s: float) -> dict:
    """Prefill a random prompt, then generate greedily with a manual loop over the cache."""
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=DEVICE)
    synchronize()
    start = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize()
    prefill_s = time.perf_counter() - start

    cache_bytes = {0: cache.memory_bytes()}
    clock = Clock(DEVICE)
    clock.mark()
    deadline = time.perf_counter() + time_budget_s
    generated = 0
    for step in range(new_tokens):
        out = model(next_ids, cache=cache, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        clock.mark()
        generated = step + 1
        if generated in checkpoints or generated == new_tokens:
            cache_bytes[generated] = cache.memory_bytes()
        if generated % 256 == 0 and time.perf_counter() > deadline:
            break
    steps = clock.step_ms()
    latency = {}
    for point in checkpoints:
        window = steps[point:point + block]
        if len(window) == block:
            latency[point] = statistics.median(window)
    return {
        "prefill_s": prefill_s,
        "generated": generated,
        "truncated": generated < new_tokens,
        "latency_ms": latency,
        "median_latency_ms": statistics.median(steps) if steps else None,
        "cache_bytes": cache_bytes,
        "cache_seq_length": cache.get_seq_length(),
        "cache_layer_shapes": [list(layer.keys.shape) for layer in cache],
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: checks the logic only")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32768; quick 96)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 8192; quick 64)")
    parser.add_argument("--window", type=int, default=None, help="window of the gatedfwa model (default 2048; quick 16)")
    parser.add_argument("--batch", type=int, default=None, help="sequences generated at once (default 1)")
    parser.add_argument("--kinds", default="gatedfwa,full", help="attention kinds to run, comma-separated")
    parser.add_argument("--budget-s", type=float, default=75.0,
                        help="generation time limit per run; a run past it stops early and is marked truncated")
    args = parser.parse_args()

    prompt_len = args.prompt or (96 if QUICK else 32768)
    new_tokens = args.new_tokens or (64 if QUICK else 8192)
    window = args.window or (16 if QUICK else 2048)
    batch = args.batch or 1
    block = 8 if QUICK else 64
    checkpoints = [0, 1024, 2048, 4096, 6144, new_tokens - block] if not QUICK else [0, 16, 32, new_tokens - block]
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model_fields = QUICK_MODEL if QUICK else FULL_MODEL

    rows, runs = [], []
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        uses_window = kind in ("gatedfwa", "swa")
        config = GatedFWAConfig(**model_fields, attention_kinds=kind, window_size=window if uses_window else None)
        record = {"kind": kind, "window": config.window_size if uses_window else None, "batch": batch,
                  "prompt": prompt_len, "new_tokens": new_tokens}
        try:
            torch.manual_seed(0)
            model = GatedFWAForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()
            record["parameters"] = sum(p.numel() for p in model.parameters())
            # Warm-up: compiles every kernel (prefill, gate, decode) before anything is timed.
            run_generation(model, min(prompt_len, 4 * window), 2 * block, batch, [0], block, time_budget_s=60)
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result = run_generation(model, prompt_len, new_tokens, batch, checkpoints, block, args.budget_s)
            record.update(result)
        except Exception as exc:  # recorded, and the next kind still runs
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=8)
            print(record["traceback"], file=sys.stderr)
        finally:
            model = None
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        runs.append(record)
        row = {"kind": kind, "window": record["window"] or "-", "batch": batch,
               "prefill s": record.get("prefill_s", "error"), "generated": record.get("generated", 0)}
        for point in checkpoints:
            row[f"ms/token @{point}"] = record.get("latency_ms", {}).get(point, "-")
        cache_bytes = record.get("cache_bytes", {})
        if cache_bytes:
            row["cache MiB start"] = cache_bytes[min(cache_bytes)] / 2**20
            row["cache MiB end"] = cache_bytes[max(cache_bytes)] / 2**20
        rows.append(row)
        print(row, flush=True)

    columns = ["kind", "window", "batch", "prefill s", "generated"] + [f"ms/token @{p}" for p in checkpoints]
    columns += ["cache MiB start", "cache MiB end"]
    name = "bench_generate_quick" if QUICK else "bench_generate"
    payload = {
        "environment": environment(),
        "device": DEVICE,
        "dtype": str(dtype),
        "config": {"model": model_fields, "prompt": prompt_len, "new_tokens": new_tokens, "window": window,
                   "batch": batch, "latency_block_steps": block, "checkpoints": checkpoints,
                   "decoding": "greedy, manual loop: model(next_token, cache=cache, logits_to_keep=1)"},
        "runs": runs,
    }
    write_results(args.out, name, payload, rows, columns)
    print(f"wrote {Path(args.out) / name}.json and .md")


if __name__ == "__main__":
    main()
