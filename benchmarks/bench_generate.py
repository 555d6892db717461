"""Generation: ms/token of a ~125M-parameter model, windowed cache vs full attention, eager
and as one CUDA graph per step.

Runs (each "scenario:implementation"):

    scenarios        b1   batch 1, a 512-token prompt, then 8192 generated tokens
                     b32  batch 32, a 32768-token prompt, then 512 generated tokens
    implementations  gatedfwa-graph  GatedFWA (window 2048) with StaticWindowCache, the step
                                     compiled with torch.compile(mode="reduce-overhead",
                                     fullgraph=True): one CUDA graph replay per token; the
                                     prompt prefilled in chunks of 8192 (O(w) attention memory)
                     gatedfwa-eager  the same model with the growing WindowCache, uncompiled
                     nsa-eager       the same shape with attention_kinds="nsa-gatedfwa" (NSA,
                                     its sliding branch the gated window) and its growing
                                     NSALayerCache, uncompiled (no static NSA cache yet)
                     full-graph      the same model with attention_kinds="full" and a static
                                     cache of prompt + new tokens, compiled the same way
                     hf-static       transformers' LlamaForCausalLM of the same shape (full
                                     attention, SDPA) with transformers' StaticCache, compiled
                                     the same way: the peer

The table gives the per-token latency at several points of the generated length (median over
a block of steps starting there), the prefill time and the cache memory.

    python benchmarks/bench_generate.py --out benchmarks/results     # H200: about 6 minutes
    python benchmarks/bench_generate.py --quick --out /tmp/gen        # tiny CPU run of the logic

Per-step latency comes from CUDA events recorded between steps (no host synchronisation
inside the loop: the next token stays on the device), so it is the wall time per token as
the GPU sees it, launch overhead included. The compiled runs first replay a few steps at a
shorter context (compilation and graph capture are not timed). Every run is in its own try
block: an error is recorded in the JSON and the next run goes on; a run past --budget-s
stops early (marked truncated), and runs that would start after --total-budget-s are
skipped (marked so). With --quick the files are named *_quick and hold CPU wall times of a
tiny model (logic check only; "graph" runs compile with the aot_eager backend there).

Writes bench_generate.json and bench_generate.md (GPU name, versions, commit, config).
"""

from __future__ import annotations

import argparse
import inspect
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
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import environment, write_results  # noqa: E402

from gatedfwa.models import GatedFWAConfig, GatedFWAForCausalLM  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() and not QUICK else "cpu"

FULL_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, head_dim=64, rope_theta=500000.0,
                  max_position_embeddings=65536, tie_word_embeddings=True)
QUICK_MODEL = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                   tie_word_embeddings=True)

# scenario -> (batch, prompt tokens, generated tokens, latency checkpoints, block of steps)
SCENARIOS = {
    "b1": (1, 512, 8192, [0, 1024, 2048, 4096, 6144, 8192 - 64], 64),
    "b32": (32, 32768, 512, [0, 128, 256, 512 - 64], 64),
}
QUICK_SCENARIOS = {
    "b1": (1, 24, 40, [0, 16, 32], 8),
    "b32": (3, 48, 24, [0, 16], 8),
}
DEFAULT_RUNS = "b1:gatedfwa-graph,b1:hf-static,b32:gatedfwa-graph,b32:hf-static,b1:gatedfwa-eager,b1:nsa-eager"
PREFILL_CHUNK = 8192


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


def compiled(fn):
    """The step as the runs time it: reduce-overhead (CUDA graphs) on a GPU, aot_eager in
    the quick CPU run (the same tracing, fullgraph, without a GPU)."""
    if DEVICE == "cuda":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def cache_kwarg(model) -> str:
    """transformers renamed the forward's cache argument from past_key_values to cache (5.2x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Session:
    """One model and cache behind two calls: prefill(prompt) -> first next ids [B, 1], and
    step(ids [B, 1]) -> next ids [B, 1] (greedy); cache_bytes() and cache_shapes()."""

    def __init__(self, implementation: str, model_fields: dict, window: int, dtype, max_length: int):
        self.implementation = implementation
        self.max_length = max_length
        torch.manual_seed(0)
        if implementation == "hf-static":
            from transformers import LlamaConfig, LlamaForCausalLM

            fields = {k: v for k, v in model_fields.items() if k != "max_position_embeddings"}
            config = LlamaConfig(**fields, max_position_embeddings=max(max_length, 2048), attn_implementation="sdpa")
            self.model = LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()
        else:
            kind = {"full-graph": "full", "nsa-eager": "nsa-gatedfwa"}.get(implementation, "gatedfwa")
            config = GatedFWAConfig(**model_fields, attention_kinds=kind, window_size=None if kind == "full" else window)
            self.model = GatedFWAForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.forward = compiled(self.model.forward) if implementation.endswith(("-graph", "-static")) else self.model.forward
        self.cache = None
        self.positions = None

    def new_cache(self, batch: int):
        if self.implementation == "hf-static":
            from transformers import StaticCache

            return StaticCache(config=self.model.config, max_cache_len=self.max_length)
        if self.implementation.endswith("-eager"):
            return self.model.new_cache()
        chunk = PREFILL_CHUNK if not QUICK else 16
        return self.model.new_static_cache(self.max_length, prefill_chunk_size=chunk)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        batch, length = prompt.shape
        if self.cache is not None and not self.implementation.endswith("-eager"):
            # The same buffers again: the captured graph keeps its addresses (no re-capture).
            self.cache.reset()
        else:
            self.cache = self.new_cache(batch)
        if self.implementation == "hf-static":
            # In chunks: a static cache makes SDPA take an explicit mask [B, 1, chunk, max_length].
            chunk = 2048 if not QUICK else 16
            for start in range(0, length, chunk):
                piece = prompt[:, start:start + chunk]
                positions = torch.arange(start, start + piece.shape[1], device=DEVICE)[None].expand(batch, -1)
                logits = self.model(piece, position_ids=positions, logits_to_keep=1,
                                    **{cache_kwarg(self.model): self.cache}).logits
            self.positions = torch.full((batch, 1), length, dtype=torch.long, device=DEVICE)
        else:
            logits = self.model(prompt, cache=self.cache, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.forward is not self.model.forward and DEVICE == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        if self.implementation == "hf-static":
            logits = self.forward(ids, position_ids=self.positions, logits_to_keep=1,
                                  **{cache_kwarg(self.model): self.cache}).logits
            self.positions = self.positions + 1
        else:
            logits = self.forward(ids, cache=self.cache, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def cache_bytes(self) -> int:
        if self.implementation == "hf-static":
            return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))
        return self.cache.memory_bytes()

    def cache_shapes(self) -> list | dict:
        """The first layer's cache tensors' shapes (every layer's are the same)."""
        if self.implementation == "hf-static":
            return [list(layer.keys.shape) for layer in self.cache.layers]
        return {name: list(t.shape) for name, t in self.cache[0].tensors().items() if t is not None}


def run_generation(session: Session, prompt_len: int, new_tokens: int, batch: int, checkpoints: list[int],
                   block: int, time_budget_s: float) -> dict:
    """Prefill a random prompt, then generate greedily one token per step."""
    vocab = session.model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=DEVICE)
    synchronize()
    start = time.perf_counter()
    next_ids = session.prefill(prompt)
    synchronize()
    prefill_s = time.perf_counter() - start

    cache_bytes = {0: session.cache_bytes()}
    clock = Clock(DEVICE)
    clock.mark()
    deadline = time.perf_counter() + time_budget_s
    generated = 0
    for step in range(new_tokens):
        next_ids = session.step(next_ids)
        clock.mark()
        generated = step + 1
        if generated % 256 == 0 and time.perf_counter() > deadline:
            break
    cache_bytes[generated] = session.cache_bytes()
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
        "cache_layer_shapes": session.cache_shapes(),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: checks the logic only")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="scenario:implementation pairs, comma-separated "
                        "(scenarios b1, b32; implementations gatedfwa-graph, gatedfwa-eager, nsa-eager, full-graph, "
                        "hf-static)")
    parser.add_argument("--window", type=int, default=None, help="window of the gatedfwa model (default 2048; quick 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="override every scenario's generated tokens")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="generation time limit per run; a run past it stops early and is marked truncated")
    parser.add_argument("--total-budget-s", type=float, default=330.0,
                        help="runs that would start after this many seconds are skipped")
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args, strict=not args.quick)

    window = args.window or (8 if QUICK else 2048)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model_fields = QUICK_MODEL if QUICK else FULL_MODEL
    scenarios = QUICK_SCENARIOS if QUICK else SCENARIOS
    began = time.perf_counter()
    env = environment()
    name = "bench_generate_quick" if QUICK else "bench_generate"

    rows, runs = [], []
    all_points = set()
    for spec in [r.strip() for r in args.runs.split(",") if r.strip()]:
        scenario, _, implementation = spec.partition(":")
        batch, prompt_len, new_tokens, checkpoints, block = scenarios[scenario]
        if args.new_tokens:
            new_tokens = args.new_tokens
            checkpoints = [p for p in checkpoints if p + block <= new_tokens] + [new_tokens - block]
            checkpoints = sorted(set(p for p in checkpoints if p >= 0))
        if implementation.endswith("-eager") and not QUICK:
            new_tokens, checkpoints = min(new_tokens, 1024), [p for p in checkpoints if p + block <= 1024]
        all_points.update(checkpoints)
        record = {"scenario": scenario, "implementation": implementation, "batch": batch, "prompt": prompt_len,
                  "new_tokens": new_tokens,
                  "window": window if implementation.startswith(("gatedfwa", "nsa")) else None}
        session = None
        try:
            if time.perf_counter() - began > args.total_budget_s:
                raise TimeoutError(f"skipped: the total budget of {args.total_budget_s:.0f} s was spent")
            max_length = prompt_len + new_tokens + 1
            session = Session(implementation, model_fields, window, dtype, max_length)
            record["parameters"] = session.parameters
            # Warm-up: compiles every kernel and captures the step's graph at a short context
            # (the cache shapes, so the graph, are the timed run's).
            compile_start = time.perf_counter()
            run_generation(session, min(prompt_len, 4 * window), 2 * block, batch, [0], block, time_budget_s=60)
            record["warmup_s"] = time.perf_counter() - compile_start
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            record.update(run_generation(session, prompt_len, new_tokens, batch, checkpoints, block, args.budget_s))
        except Exception as exc:  # recorded, and the next run still goes
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=8)
            print(record["traceback"], file=sys.stderr)
        finally:
            session = None
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        runs.append(record)
        row = {"scenario": scenario, "implementation": implementation, "batch": batch, "prompt": prompt_len,
               "prefill s": record.get("prefill_s", record.get("error", "error")[:60]),
               "generated": record.get("generated", 0)}
        for point in checkpoints:
            row[f"ms/token @{point}"] = record.get("latency_ms", {}).get(point, "-")
        cache_bytes = record.get("cache_bytes", {})
        if cache_bytes:
            row["cache MiB"] = cache_bytes[max(cache_bytes)] / 2**20
        rows.append(row)
        print(row, flush=True)
        # Written after every run: a run cut short from outside leaves the earlier ones.
        columns = ["scenario", "implementation", "batch", "prompt", "prefill s", "generated"]
        columns += [f"ms/token @{p}" for p in sorted(all_points)] + ["cache MiB"]
        payload = {
            "environment": env,
            "device": DEVICE,
            "dtype": str(dtype),
            "config": {"model": model_fields, "window": window, "scenarios": scenarios, "runs": args.runs,
                       "prefill_chunk": PREFILL_CHUNK,
                       "decoding": "greedy, one token per step: forward(next_ids, cache, logits_to_keep=1), argmax"},
            "runs": runs,
        }
        write_results(args.out, name, payload, rows, columns)
    print(f"wrote {Path(args.out) / name}.json and .md")


if __name__ == "__main__":
    main()
