"""A transformers model trained through attn_implementation="gatedfwa", "sdpa" and
"flex_attention": forward + backward time of the same model, same weights.

The model is a ~125M-parameter Mistral (transformers' MistralForCausalLM, random weights,
bf16): 12 layers, hidden 768, 12 query heads and 4 key/value heads of 64, MLP 2048, vocab
32000, untied embeddings, every layer a sliding window of 4096. One step reads a batch of
random token ids (T = 8192), computes the language-model loss and its gradients; do_bench
gives the median over repetitions, gradients reset between calls, the inputs cycling
through a few fresh batches. A forward pass without gradients (logits of the last token
only: a prefill) is timed too. Before timing, each implementation's logits at the last 2048
positions are compared with sdpa's (the check column: max |difference| in bf16).

    python benchmarks/bench_hf_attention.py --out benchmarks/results     # H200: about 2-3 minutes
    python benchmarks/bench_hf_attention.py --quick --out /tmp/hf         # tiny CPU run of the logic

Every implementation runs in its own try block: one that fails (flex_attention's compile,
memory) is recorded as an error in the JSON and the others still run. With --quick the files
are named *_quick and hold CPU wall times of a tiny model (logic check only).

Writes hf_attention.json and hf_attention.md (GPU name, torch/triton/transformers versions,
commit, config, timings, tokens/s).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

QUICK = "--quick" in sys.argv
if QUICK and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

import transformers  # noqa: E402
from common import bench_ms, environment, error_record, write_results  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM  # noqa: E402

import gatedfwa  # noqa: E402,F401  (registers attn_implementation="gatedfwa")

DEVICE = "cuda" if torch.cuda.is_available() and not QUICK else "cpu"

FULL_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=64, rope_theta=10000.0,
                  max_position_embeddings=32768, tie_word_embeddings=False, attention_dropout=0.0)
QUICK_MODEL = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
CHECK_POSITIONS = 2048  # logits compared with sdpa's at this many last positions


def time_ms(fn, grad_to_none=None, reps: int = 5) -> float:
    """Median milliseconds of fn: do_bench on the GPU; on the CPU a few wall-clock calls."""
    if DEVICE == "cuda":
        return bench_ms(fn, warmup_ms=100, rep_ms=1000, grad_to_none=grad_to_none)
    times = []
    for _ in range(reps):
        if grad_to_none is not None:
            for p in grad_to_none:
                p.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(model, impl: str, batches: list[torch.Tensor], reference_logits: torch.Tensor | None) -> dict:
    """Check the logits against sdpa's, then time forward + backward and a forward pass."""
    model.set_attn_implementation(impl)
    params = [p for p in model.parameters() if p.requires_grad]
    result = {}
    with torch.no_grad():
        logits = model(input_ids=batches[0], use_cache=False, logits_to_keep=CHECK_POSITIONS).logits
    result["check_logits_max_abs"] = float(logits.float().abs().max())
    if reference_logits is not None:
        result["max_abs_diff_vs_sdpa"] = float((logits.float() - reference_logits.float()).abs().max())

    inputs = itertools.cycle(batches)

    def train_step():
        ids = next(inputs)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def prefill():
        with torch.no_grad():
            model(input_ids=next(inputs), use_cache=False, logits_to_keep=1)

    for _ in range(2):  # compiles what compiles (flex_attention, Triton autotuning) before timing
        train_step()
        prefill()
    for p in params:
        p.grad = None
    synchronize()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step()
    synchronize()
    if DEVICE == "cuda":
        result["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    for p in params:
        p.grad = None
    result["forward_backward_ms"] = time_ms(train_step, grad_to_none=params)
    result["forward_ms"] = time_ms(prefill)
    tokens = batches[0].numel()
    result["tokens_per_s"] = tokens / (result["forward_backward_ms"] / 1e3)
    result["prefill_tokens_per_s"] = tokens / (result["forward_ms"] / 1e3)
    if reference_logits is None:
        result["logits"] = logits
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: checks the logic only")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 8192; quick 128)")
    parser.add_argument("--window", type=int, default=None, help="sliding window (default 4096; quick 32)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--impls", default="sdpa,gatedfwa,flex_attention",
                        help="attn_implementation values, comma-separated; sdpa first gives the check column")
    provenance.add_options(parser)
    args = parser.parse_args()
    provenance.settle_or_exit(parser, args, strict=not args.quick)

    seqlen = args.seqlen or (128 if QUICK else 8192)
    window = args.window or (32 if QUICK else 4096)
    model_fields = dict(QUICK_MODEL if QUICK else FULL_MODEL, sliding_window=window)
    if QUICK:
        model_fields["max_position_embeddings"] = max(seqlen, 256)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**model_fields)).to(device=DEVICE, dtype=dtype).train()
    parameters = sum(p.numel() for p in model.parameters())
    batches = [torch.randint(0, model_fields["vocab_size"], (args.batch, seqlen), device=DEVICE) for _ in range(3)]

    runs, rows = [], []
    reference_logits = None
    for impl in impls:
        record = {"attn_implementation": impl}
        try:
            result = measure(model, impl, batches, reference_logits)
            if impl == "sdpa":
                reference_logits = result.pop("logits")
            result.pop("logits", None)
            record.update(result)
        except Exception as exc:  # recorded, and the next implementation still runs
            record.update(error_record(exc))
            print(record["traceback"], file=sys.stderr)
        finally:
            for p in model.parameters():
                p.grad = None
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        runs.append(record)
        print({k: v for k, v in record.items() if k != "traceback"}, flush=True)

    sdpa_ms = next((r.get("forward_backward_ms") for r in runs if r["attn_implementation"] == "sdpa"), None)
    for record in runs:
        ms = record.get("forward_backward_ms")
        rows.append({
            "attn_implementation": record["attn_implementation"],
            "fwd+bwd ms": ms if ms is not None else "error",
            "tokens/s (fwd+bwd)": record.get("tokens_per_s", "-"),
            "speed-up vs sdpa": sdpa_ms / ms if (ms and sdpa_ms) else "-",
            "forward ms": record.get("forward_ms", "-"),
            "peak GiB": record.get("peak_memory_GiB", "-"),
            "max abs logit diff vs sdpa": record.get("max_abs_diff_vs_sdpa", "-"),
            "error": record.get("error", ""),
        })

    name = "hf_attention_quick" if QUICK else "hf_attention"
    payload = {
        "environment": dict(environment(), transformers=transformers.__version__),
        "device": DEVICE,
        "dtype": str(dtype),
        "config": {
            "model": "MistralForCausalLM", "fields": model_fields, "parameters": parameters,
            "batch": args.batch, "seqlen": seqlen, "window": window, "tokens_per_step": args.batch * seqlen,
            "step": "model(input_ids, labels=input_ids).loss.backward(), gradients reset between calls",
            "forward": "no_grad model(input_ids, logits_to_keep=1)",
            "timing": "triton do_bench median (warm-up 100 ms, 1000 ms of repetitions)" if DEVICE == "cuda"
            else "median of 5 wall-clock calls",
            "check": f"max |logits - sdpa logits| over the last {CHECK_POSITIONS} positions of one batch",
        },
        "runs": runs,
    }
    columns = ["attn_implementation", "fwd+bwd ms", "tokens/s (fwd+bwd)", "speed-up vs sdpa", "forward ms",
               "peak GiB", "max abs logit diff vs sdpa", "error"]
    write_results(args.out, name, payload, rows, columns)
    print(f"wrote {Path(args.out) / name}.json and .md")


if __name__ == "__main__":
    main()
