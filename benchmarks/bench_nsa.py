"""NSA with a gated sliding branch on a GPU: timing beside fla's parallel_nsa (where it runs:
query groups of 16 and more) and, as context, gatedfwa's window op and full causal attention.

    python benchmarks/bench_nsa.py --out benchmarks/results            # all shapes
    python benchmarks/bench_nsa.py --out /tmp/x --seqlens 8192          # one length

Shapes: T in {8k, 32k, 64k}; HQ=64 H=4 (group 16) and HQ=16 H=16 (group 1); D=128, block
size 64, 16 selected blocks, window 512, bf16. Forward and forward+backward, do_bench medians.
Writes nsa_speed.json/.md. TFLOP/s count 4 * HQ * D flops per attended (query, key) pair
(3.5x that for forward+backward) over the pairs of the branches the row runs: compressed
(visible summaries), selected (the selected blocks' keys up to the query), sliding, or all
causal pairs for the full causal row. The last rows give the issue's targets as ratios.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import attention_tflops, bench_ms, environment, error_record, window_pairs, write_results  # noqa: E402

from gatedfwa.ops.window_attention import gated_window_attention  # noqa: E402
from gatedfwa.ops.nsa import nsa_attention  # noqa: E402

DEVICE = "cuda"
HEAD_DIM, BLOCK_SIZE, BLOCK_COUNTS, WINDOW = 128, 64, 16, 512
HEADS = [(64, 4), (16, 16)]  # (query heads, kv heads): groups 16 and 1
SEQLENS = [8192, 32768, 65536]


def make_inputs(seqlen, q_heads, kv_heads):
    def leaf(*shape, fn=torch.randn):
        return fn(*shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_()

    q, k, v = leaf(1, seqlen, q_heads, HEAD_DIM), leaf(1, seqlen, kv_heads, HEAD_DIM), leaf(1, seqlen, kv_heads, HEAD_DIM)
    g = F.logsigmoid(torch.randn(1, seqlen, q_heads, device=DEVICE) + 3).requires_grad_()
    gates = [torch.sigmoid(torch.randn(1, seqlen, q_heads, device=DEVICE, dtype=torch.bfloat16)).requires_grad_()
             for _ in range(3)]
    return q, k, v, g, gates


def branch_pairs(seqlen: int, branches: tuple[str, ...]) -> int:
    """Attended (query, key) pairs of one head over the given branches (selected: every query
    attends to min(16, own block + 1) whole blocks, less the own block's future keys)."""
    t = torch.arange(seqlen, dtype=torch.float64)
    pairs = 0.0
    if "cmp" in branches:
        pairs += torch.floor((t + 1) / BLOCK_SIZE).sum().item()
    if "slc" in branches:
        blocks = torch.clamp(torch.floor(t / BLOCK_SIZE) + 1, max=BLOCK_COUNTS)
        pairs += (blocks * BLOCK_SIZE - (BLOCK_SIZE - 1 - t % BLOCK_SIZE)).sum().item()
    if "swa" in branches:
        pairs += window_pairs([seqlen], WINDOW)
    if "causal" in branches:
        pairs += window_pairs([seqlen], None)
    return int(pairs)


def run_shape(seqlen, q_heads, kv_heads, rows):
    q, k, v, g, (g_cmp, g_slc, g_swa) = make_inputs(seqlen, q_heads, kv_heads)
    do = torch.randn_like(q)
    shape = f"T{seqlen} HQ{q_heads} H{kv_heads} (group {q_heads // kv_heads})"
    options = dict(block_size=BLOCK_SIZE, block_counts=BLOCK_COUNTS, window_size=WINDOW)

    def record(name, fwd, leaves, branches, note=""):
        row = {"shape": shape, "implementation": name, "branches": "+".join(branches), "note": note}
        pairs = branch_pairs(seqlen, branches)
        try:
            fwd()
            torch.cuda.synchronize()
            with torch.no_grad():
                ms = bench_ms(fwd)
            row["fwd ms"] = ms
            row["fwd TFLOP/s"] = attention_tflops(pairs, q_heads, HEAD_DIM, ms, backward=False)

            def step():
                fwd().backward(do)

            step()
            ms = bench_ms(step, grad_to_none=leaves)
            row["fwd+bwd ms"] = ms
            row["fwd+bwd TFLOP/s"] = attention_tflops(pairs, q_heads, HEAD_DIM, ms, backward=True)
            row["fwd+bwd ms per query head"] = ms / q_heads
        except Exception as exc:  # a variant that fails is recorded, not fatal
            row.update(error_record(exc))
            traceback.print_exc()
        rows.append(row)
        print({key: value for key, value in row.items() if key != "traceback"}, flush=True)
        torch.cuda.empty_cache()

    all_three = ("cmp", "slc", "swa")
    record("gatedfwa NSA (gated sliding branch)",
           lambda: nsa_attention(q, k, v, g, g_cmp, g_slc, g_swa, **options), [q, k, v, g, g_cmp, g_slc, g_swa],
           all_three)
    record("gatedfwa NSA (g=None: plain SWA branch)",
           lambda: nsa_attention(q, k, v, None, g_cmp, g_slc, g_swa, **options), [q, k, v, g_cmp, g_slc, g_swa],
           all_three)
    record("gatedfwa NSA cmp+slc (no sliding branch)",
           lambda: nsa_attention(q, k, v, None, g_cmp, g_slc, None, **options), [q, k, v, g_cmp, g_slc],
           ("cmp", "slc"))
    record(f"gatedfwa window op (gated, w={WINDOW})",
           lambda: gated_window_attention(q, k, v, g, window_size=WINDOW), [q, k, v, g], ("swa",))
    record("gatedfwa full causal (ungated window op, w=None)",
           lambda: gated_window_attention(q, k, v, None, window_size=None), [q, k, v], ("causal",))
    fla_peer(q, k, v, g_cmp, g_slc, g_swa, q_heads // kv_heads, record, rows, shape)


def fla_peer(q, k, v, g_cmp, g_slc, g_swa, group, record, rows, shape):
    """fla's parallel_nsa (its kernels need query groups that are powers of two >= 16): with
    compression and selection, and with its sliding branch (flash-attn) where that imports."""
    try:
        from fla.ops.nsa.parallel import parallel_nsa
    except Exception as exc:  # noqa: BLE001 - missing wheel or a broken import
        rows.append({"shape": shape, "implementation": "fla parallel_nsa", **error_record(exc)})
        return
    if group < 16:
        return  # parallel_nsa raises for groups below 16: nothing to time
    options = dict(block_counts=BLOCK_COUNTS, block_size=BLOCK_SIZE)
    record("fla parallel_nsa cmp+slc",
           lambda: parallel_nsa(q, k, v, g_cmp, g_slc, None, window_size=0, **options), [q, k, v, g_cmp, g_slc],
           ("cmp", "slc"))
    record("fla parallel_nsa (flash-attn sliding branch, no gate)",
           lambda: parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, window_size=WINDOW, **options),
           [q, k, v, g_cmp, g_slc, g_swa], ("cmp", "slc", "swa"))


def add_ratios(rows):
    """Target rows: ours / fla (forward, forward+backward), the gate's cost, group 1 vs 16."""
    by = {(r["shape"], r["implementation"]): r for r in rows if "error" not in r}
    ratios = []
    for (shape, name), row in list(by.items()):
        seqlen = shape.split()[0]
        if name == "gatedfwa NSA cmp+slc (no sliding branch)" and (shape, "fla parallel_nsa cmp+slc") in by:
            peer = by[(shape, "fla parallel_nsa cmp+slc")]
            for key in ("fwd ms", "fwd+bwd ms"):
                ratios.append({"shape": shape, "implementation": f"speedup over fla cmp+slc ({key[:-3]})",
                               "value": peer[key] / row[key], "note": "target >= 1.5"})
        if name == "gatedfwa NSA (gated sliding branch)":
            plain = by.get((shape, "gatedfwa NSA (g=None: plain SWA branch)"))
            if plain:
                ratios.append({"shape": shape, "implementation": "gate cost: gated / g=None (fwd+bwd)",
                               "value": row["fwd+bwd ms"] / plain["fwd+bwd ms"], "note": "target <= 1.05"})
            if "group 1)" in shape:
                for (other, other_name), other_row in by.items():
                    if other_name == name and other.startswith(seqlen + " ") and "group 16" in other:
                        ratios.append({"shape": shape, "implementation": "group 1 / group 16 per query head (fwd+bwd)",
                                       "value": row["fwd+bwd ms per query head"] / other_row["fwd+bwd ms per query head"],
                                       "note": "target <= 1.5"})
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    parser.add_argument("--seqlens", type=int, nargs="+", default=SEQLENS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("a CUDA GPU is required")
    env = environment()
    rows = []
    for seqlen in args.seqlens:
        for q_heads, kv_heads in HEADS:
            try:
                run_shape(seqlen, q_heads, kv_heads, rows)
            except Exception as exc:  # e.g. out of memory at one shape: keep the others
                rows.append({"shape": f"T{seqlen} HQ{q_heads} H{kv_heads}", **error_record(exc)})
            torch.cuda.empty_cache()
    rows += add_ratios(rows)
    payload = {"environment": env, "settings": dict(head_dim=HEAD_DIM, block_size=BLOCK_SIZE,
                                                     block_counts=BLOCK_COUNTS, window=WINDOW, dtype="bfloat16"),
               "rows": rows}
    columns = ["shape", "implementation", "branches", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
               "value", "note", "error"]
    write_results(args.out, "nsa_speed", payload, rows, columns)


if __name__ == "__main__":
    main()
