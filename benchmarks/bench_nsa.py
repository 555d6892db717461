"""NSA with a gated sliding branch on a GPU: timing beside fla's parallel_nsa (where it runs:
query groups of 16 and more) and, as context, gatedfwa's window op and full causal attention.

    python benchmarks/bench_nsa.py --out benchmarks/results            # all shapes
    python benchmarks/bench_nsa.py --out /tmp/x --seqlens 8192          # one length
    python benchmarks/bench_nsa.py --out /tmp/x --sweep                 # tile configs first
    python benchmarks/bench_nsa.py --out /tmp/x --seqlens 32768 --compare-selected

Shapes: T in {8k, 32k, 64k}; HQ=64 H=4 (group 16) and HQ=16 H=16 (group 1); D=128, block
size 64, 16 selected blocks, window 512, bf16. Forward and forward+backward, do_bench medians.
Writes nsa_speed.json/.md. TFLOP/s count 4 * HQ * D flops per attended (query, key) pair
(3.5x that for forward+backward) over the pairs of the branches the row runs: compressed
(visible summaries), selected (the selected blocks' keys up to the query), sliding, or all
causal pairs for the full causal row. The last rows give the issue's targets as ratios.

nsa_kernels.json/.md: device time per call of each kernel of one forward+backward of the
gated NSA (torch.profiler, L2 flushed), grouped by stage: compressed attention (fwd, dq,
dk/dv), block selection, selected attention (fwd, dq, dk/dv), the sliding branch (window op)
and PyTorch's own kernels (block pooling, branch combine, casts, the selection's inversion).

--sweep first tries a few launch configs per kernel family (compressed.py, selection.py,
selected.py, selected_block_major.py's forward where a group runs it), per group size: each
is checked on a small input against the float64 reference (the rule of docs/correctness.md
on the output and the q/k/v gradients, with the reference's selection given; the selection
kernel by its agreement with the reference's blocks), then timed at T=8192 by its kernels'
device time. The fastest passing config of each family is written to nsa_sweep.json/.md and
used for the speed rows that follow.

--compare-selected times, instead of the rows above, the selected branch's two strategies
(gatedfwa/ops/nsa/selected.py: query-major, block-major) at both shapes: the gated NSA and
cmp+slc forward and forward+backward, the device time of the selected-attention kernels, and
group 1 / group 16 per query head for each pair of strategies. Writes
nsa_selected_compare.json/.md.
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
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import (  # noqa: E402
    attention_tflops,
    bench_ms,
    environment,
    error_record,
    kernel_device_ms,
    window_pairs,
    write_results,
)

from gatedfwa.ops.nsa import launch as nsa_launch  # noqa: E402
from gatedfwa.ops.nsa import nsa_attention  # noqa: E402
from gatedfwa.ops.nsa.naive import naive_nsa_attention  # noqa: E402
from gatedfwa.ops.window_attention import gated_window_attention  # noqa: E402
from gatedfwa.testing import assert_within_rule  # noqa: E402

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


# Kernel name fragments -> stage, in the order of the kernels table.
STAGES = [
    ("_compressed_forward_kernel", "compressed attention fwd"),
    ("_compressed_dq_kernel", "compressed attention dq"),
    ("_compressed_dkdv_kernel", "compressed attention dk/dv"),
    ("_select_kernel", "selection top-k"),
    ("_selected_forward_kernel", "selected attention fwd"),
    ("_selected_row_lse_kernel", "selected attention fwd"),  # block-major: pass 1
    ("_selected_output_kernel", "selected attention fwd"),  # block-major: pass 2
    ("_selected_dq_kernel", "selected attention dq"),
    ("_selected_dkdv_kernel", "selected attention dk/dv (block-major: and dq)"),
    ("_forward_kernel", "sliding window fwd (window op)"),
    ("_delta_kernel", "sliding window bwd (window op)"),
    ("_dq_kernel", "sliding window bwd (window op)"),
    ("_dkdv_kernel", "sliding window bwd (window op)"),
    ("_reverse_cumsum_kernel", "sliding window bwd (window op)"),
]
OTHER_STAGE = "PyTorch kernels (pooling, combine, casts, selection inversion)"


def stage_of(kernel_name: str) -> str:
    for fragment, stage in STAGES:
        if fragment in kernel_name:
            return stage
    return OTHER_STAGE


def kernel_rows(shape, step, family_configs):
    """Device ms per stage of one forward+backward (step), and each kernel on its own."""
    times = kernel_device_ms(step)
    stages: dict[str, float] = {}
    for name, ms in times.items():
        stages[stage_of(name)] = stages.get(stage_of(name), 0.0) + ms
    total = sum(stages.values())
    order = [stage for _, stage in STAGES] + [OTHER_STAGE]
    rows = [{"shape": shape, "stage": stage, "device ms": stages[stage], "share": stages[stage] / total}
            for stage in dict.fromkeys(order) if stage in stages]
    rows.append({"shape": shape, "stage": "total", "device ms": total, "share": 1.0,
                 "configs": family_configs})
    kernels = [{"shape": shape, "kernel": name, "device ms": ms} for name, ms in sorted(times.items(), key=lambda x: -x[1])]
    return rows, kernels


def run_shape(seqlen, q_heads, kv_heads, rows, kernel_table=None, kernel_list=None):
    q, k, v, g, (g_cmp, g_slc, g_swa) = make_inputs(seqlen, q_heads, kv_heads)
    do = torch.randn_like(q)
    shape = f"T{seqlen} HQ{q_heads} H{kv_heads} (group {q_heads // kv_heads})"
    options = dict(block_size=BLOCK_SIZE, block_counts=BLOCK_COUNTS, window_size=WINDOW)
    if kernel_table is not None:
        def gated_step():
            nsa_attention(q, k, v, g, g_cmp, g_slc, g_swa, **options).backward(do)
            for leaf in (q, k, v, g, g_cmp, g_slc, g_swa):
                leaf.grad = None

        try:
            stage_rows, kernels = kernel_rows(shape, gated_step, active_configs(q_heads // kv_heads))
            kernel_table += stage_rows
            kernel_list += kernels
            for row in stage_rows:
                print(row, flush=True)
        except Exception as exc:  # noqa: BLE001 - the timing rows still follow
            kernel_table.append({"shape": shape, "stage": "profile", **error_record(exc)})
            traceback.print_exc()

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


# ---------------------------------------------------------------------------------------------
# Launch-config sweep
# ---------------------------------------------------------------------------------------------

# Each kernel family's rule (gatedfwa/ops/nsa/launch.py, TUNING: compressed.py, selection.py,
# selected.py, selected_block_major.py: the block-major forward's) is replaced by a candidate
# within TUNING.overridden; ROWS is raised to the group size where smaller. The first is the
# default.
FAMILIES = {"compressed": "compressed", "selection": "selection", "selected": "selected",
            "selected block-major fwd": "block_major"}  # the family's rule in nsa_launch.TUNING
KERNEL_FRAGMENT = {"compressed": "_compressed_", "selection": "_select_kernel", "selected": "_selected_",
                   "selected block-major fwd": "_selected_"}
CANDIDATES = {
    "compressed": [dict(ROWS=64, BLOCK_C=64, num_warps=4, num_stages=2),
                   dict(ROWS=128, BLOCK_C=64, num_warps=8, num_stages=2),
                   dict(ROWS=64, BLOCK_C=32, num_warps=4, num_stages=3)],
    "selection": [dict(ROWS=16, BLOCK_C=64, num_warps=4, num_stages=2),
                  dict(ROWS=32, BLOCK_C=64, num_warps=4, num_stages=2),
                  dict(ROWS=16, BLOCK_C=32, num_warps=2, num_stages=3)],
    "selected": [dict(ROWS=16, BLOCK_K=64, num_warps=4, num_stages=2),
                 dict(ROWS=32, BLOCK_K=64, num_warps=4, num_stages=2),
                 dict(ROWS=16, BLOCK_K=32, num_warps=2, num_stages=3)],
    # Only groups that run block-major (TUNING's block_major_max_group) tell these apart.
    "selected block-major fwd": [dict(ROWS=64, BLOCK_K=64, num_warps=4, num_stages=2),
                                 dict(ROWS=128, BLOCK_K=64, num_warps=8, num_stages=2),
                                 dict(ROWS=32, BLOCK_K=64, num_warps=4, num_stages=2)],
}
CHOSEN: dict[tuple[str, int], dict] = {}  # (family, group) -> config, filled by --sweep


def candidate_rule(config: dict):
    """A TUNING rule that launches with config on every architecture, ROWS raised to one group."""
    return lambda arch, block_d, group_pad, block_size: {**config, "ROWS": max(config["ROWS"], group_pad)}


def chosen_rules(group: int) -> dict:
    """The rules of the configs --sweep chose for this group size (none chosen: TUNING's own),
    for nsa_launch.TUNING.overridden(rules=...)."""
    return {FAMILIES[family]: candidate_rule(CHOSEN[(family, group)]) for family in FAMILIES
            if (family, group) in CHOSEN}


def active_configs(group: int) -> dict:
    return {family: CHOSEN.get((family, group), "default") for family in FAMILIES}


def check_inputs(q_heads, kv_heads, seqlen=400, dtype=torch.bfloat16):
    """Small inputs whose blocks have distinct summaries (keys of a block share a direction),
    so that the float64 reference's selection is rarely a near-tie."""
    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=torch.float64)

    shared = rand(1, -(-seqlen // BLOCK_SIZE), kv_heads, HEAD_DIM).repeat_interleave(BLOCK_SIZE, dim=1)[:, :seqlen]
    q, k, v = rand(1, seqlen, q_heads, HEAD_DIM), rand(1, seqlen, kv_heads, HEAD_DIM) + 2 * shared, rand(1, seqlen, kv_heads, HEAD_DIM)
    g = F.logsigmoid(rand(1, seqlen, q_heads) + 2)
    gates = [torch.sigmoid(rand(1, seqlen, q_heads)) for _ in range(3)]
    return q, k, v, g, gates


def check_config(family: str, q_heads: int, kv_heads: int) -> str:
    """'ok' or why not: the family's kernels with the config now in use against the float64
    reference on a small input (4 selected blocks, window 128)."""
    options = dict(block_size=BLOCK_SIZE, block_counts=4, window_size=128)
    q, k, v, g, gates = check_inputs(q_heads, kv_heads)
    _, reference_blocks = naive_nsa_attention(q, k, v, g, *gates, **options)
    if family == "selection":
        _, blocks = nsa_attention(q.float(), k.float(), v.float(), g.float(), *(x.float() for x in gates),
                                  return_block_indices=True, **options)
        agreement = (blocks == reference_blocks).float().mean().item()
        return "ok" if agreement >= 0.995 else f"selection agrees with the reference on {agreement:.4f} of slots"
    do = torch.randn_like(q)

    def run(fn, dtype):
        leaves = [x.to(dtype).detach().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, g.to(dtype), *(x.to(dtype) for x in gates), block_indices=reference_blocks, **options)
        if isinstance(out, tuple):
            out = out[0]
        out.backward(do.to(dtype))
        return [out.detach().double()] + [x.grad.double() for x in leaves]

    fast = run(nsa_attention, torch.bfloat16)
    low = run(naive_nsa_attention, torch.bfloat16)
    ref = run(naive_nsa_attention, torch.float64)
    try:
        for name, f, lo, r in zip(("o", "dq", "dk", "dv"), fast, low, ref):
            assert_within_rule(name, f, lo, r)
    except AssertionError as exc:
        return str(exc)
    return "ok"


def sweep(seqlen: int) -> list[dict]:
    """Per group size and family: check and time each candidate, keep the fastest passing."""
    rows = []
    for q_heads, kv_heads in HEADS:
        group = q_heads // kv_heads
        shape = f"T{seqlen} HQ{q_heads} H{kv_heads} (group {group})"
        q, k, v, g, gates = make_inputs(seqlen, q_heads, kv_heads)
        do = torch.randn_like(q)

        def step():
            nsa_attention(q, k, v, g, *gates, block_size=BLOCK_SIZE, block_counts=BLOCK_COUNTS,
                          window_size=WINDOW).backward(do)
            for leaf in (q, k, v, g, *gates):
                leaf.grad = None

        for family, candidates in CANDIDATES.items():
            if family == "selected block-major fwd" and group > nsa_launch.TUNING.knobs.block_major_max_group:
                continue  # this group's forward is query-major: the candidates would all time the same
            best = None
            for config in candidates:
                row = {"shape": shape, "family": family, "config": str(config)}
                rules = {**chosen_rules(group), FAMILIES[family]: candidate_rule(config)}
                try:
                    with nsa_launch.TUNING.overridden(rules=rules):
                        row["check"] = check_config(family, q_heads, kv_heads)
                        if row["check"] == "ok":
                            times = kernel_device_ms(step, iterations=10)
                            row["device ms"] = sum(ms for name, ms in times.items()
                                                   if KERNEL_FRAGMENT[family] in name)
                            if best is None or row["device ms"] < best[0]:
                                best = (row["device ms"], config)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    row.update(error_record(exc))
                rows.append(row)
                print({key: value for key, value in row.items() if key != "traceback"}, flush=True)
            if best is not None:
                CHOSEN[(family, group)] = best[1]
                rows.append({"shape": shape, "family": family, "config": str(best[1]), "chosen": True,
                             "device ms": best[0]})
        del q, k, v, g, gates, do
        torch.cuda.empty_cache()
    return rows


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


# ---------------------------------------------------------------------------------------------
# The selected branch's strategies side by side
# ---------------------------------------------------------------------------------------------

# TUNING's block_major_max_group per strategy: no group block-major, every group block-major.
STRATEGIES = {"query-major": 0, "block-major": 1 << 20}


def compare_selected(seqlen: int, rows: list[dict]) -> None:
    """Per shape and strategy: the gated NSA and cmp+slc, forward and forward+backward, and
    the selected-attention kernels' device time per forward+backward."""
    options = dict(block_size=BLOCK_SIZE, block_counts=BLOCK_COUNTS, window_size=WINDOW)
    default = nsa_launch.TUNING.knobs.block_major_max_group
    for q_heads, kv_heads in HEADS:
        group = q_heads // kv_heads
        shape = f"T{seqlen} HQ{q_heads} H{kv_heads} (group {group})"
        q, k, v, g, (g_cmp, g_slc, g_swa) = make_inputs(seqlen, q_heads, kv_heads)
        do = torch.randn_like(q)
        variants = {
            "gated NSA": (lambda: nsa_attention(q, k, v, g, g_cmp, g_slc, g_swa, **options),
                          [q, k, v, g, g_cmp, g_slc, g_swa]),
            "cmp+slc": (lambda: nsa_attention(q, k, v, None, g_cmp, g_slc, None, **options), [q, k, v, g_cmp, g_slc]),
        }
        for strategy, max_group in STRATEGIES.items():
            with nsa_launch.TUNING.overridden(block_major_max_group=max_group):
                for name, (fwd, leaves) in variants.items():
                    row = {"shape": shape, "strategy": strategy, "variant": name,
                           "default": strategy == ("block-major" if group <= default else "query-major")}
                    try:
                        fwd()
                        with torch.no_grad():
                            row["fwd ms"] = bench_ms(fwd)

                        def step(fwd=fwd, leaves=leaves):
                            fwd().backward(do)
                            for leaf in leaves:
                                leaf.grad = None

                        step()
                        row["fwd+bwd ms"] = bench_ms(step)
                        row["fwd+bwd ms per query head"] = row["fwd+bwd ms"] / q_heads
                        if name == "gated NSA":
                            times = kernel_device_ms(step, iterations=10)
                            for stage in ("selected attention fwd", "selected attention dq",
                                          "selected attention dk/dv (block-major: and dq)"):
                                row[stage + " (device ms)"] = sum(ms for kernel, ms in times.items()
                                                                 if stage_of(kernel) == stage)
                            row["all kernels (device ms)"] = sum(times.values())
                    except Exception as exc:  # noqa: BLE001 - a failing strategy is recorded, not fatal
                        row.update(error_record(exc))
                        traceback.print_exc()
                    rows.append(row)
                    print({key: value for key, value in row.items() if key != "traceback"}, flush=True)
        del q, k, v, g, g_cmp, g_slc, g_swa, do
        torch.cuda.empty_cache()


def compare_ratios(rows: list[dict]) -> list[dict]:
    """group 1 / group 16 fwd+bwd per query head of the gated NSA, per pair of strategies."""
    timed = [r for r in rows if r.get("variant") == "gated NSA" and "fwd+bwd ms" in r]
    ratios = []
    for small in (r for r in timed if "group 1)" in r["shape"]):
        seqlen = small["shape"].split()[0]
        for large in (r for r in timed if "group 16" in r["shape"] and r["shape"].startswith(seqlen + " ")):
            ratios.append({"shape": seqlen, "strategy": f"group 1 {small['strategy']} / group 16 {large['strategy']}",
                           "variant": "per query head (fwd+bwd)",
                           "value": small["fwd+bwd ms per query head"] / large["fwd+bwd ms per query head"],
                           "note": "target <= 1.5"})
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    parser.add_argument("--seqlens", type=int, nargs="+", default=SEQLENS)
    parser.add_argument("--sweep", action="store_true", help="choose each kernel family's launch config first")
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-kernel device times")
    parser.add_argument("--compare-selected", action="store_true",
                        help="only compare the selected branch's strategies (nsa_selected_compare)")
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    provenance.settle_or_exit(parser, args)
    if not torch.cuda.is_available():
        parser.error("a CUDA GPU is required")
    env = environment()
    settings = dict(head_dim=HEAD_DIM, block_size=BLOCK_SIZE, block_counts=BLOCK_COUNTS, window=WINDOW,
                    dtype="bfloat16")
    if args.compare_selected:
        compare_rows: list[dict] = []
        settings["block_major_max_group (default)"] = nsa_launch.TUNING.knobs.block_major_max_group
        for seqlen in args.seqlens:
            compare_selected(seqlen, compare_rows)
            table = compare_rows + compare_ratios(compare_rows)
            write_results(args.out, "nsa_selected_compare", {"environment": env, "settings": settings, "rows": table},
                          table, ["shape", "strategy", "variant", "default", "fwd ms", "fwd+bwd ms",
                                  "selected attention fwd (device ms)", "selected attention dq (device ms)",
                                  "selected attention dk/dv (block-major: and dq) (device ms)",
                                  "all kernels (device ms)", "value", "note", "error"])
        return
    if args.sweep:
        sweep_rows = sweep(8192)
        write_results(args.out, "nsa_sweep", {"environment": env, "settings": settings, "rows": sweep_rows,
                                               "chosen": {f"{family} group {group}": config
                                                          for (family, group), config in CHOSEN.items()}},
                      sweep_rows, ["shape", "family", "config", "check", "device ms", "chosen", "error"])
    rows, kernel_table, kernel_list = [], [], []
    configs = {f"group {hq // h}": active_configs(hq // h) for hq, h in HEADS}

    def save() -> None:
        """Written after every shape, so that a run cut short keeps what it measured."""
        table = rows + add_ratios(rows)
        payload = {"environment": env, "settings": settings, "configs": configs, "rows": table}
        columns = ["shape", "implementation", "branches", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
                   "value", "note", "error"]
        write_results(args.out, "nsa_speed", payload, table, columns)
        if kernel_table:
            write_results(args.out, "nsa_kernels", {"environment": env, "settings": settings, "configs": configs,
                                                     "rows": kernel_table, "kernels": kernel_list},
                          kernel_table, ["shape", "stage", "device ms", "share", "error"])

    for seqlen in args.seqlens:
        for q_heads, kv_heads in HEADS:
            try:
                with nsa_launch.TUNING.overridden(rules=chosen_rules(q_heads // kv_heads)):
                    run_shape(seqlen, q_heads, kv_heads, rows, None if args.no_kernels else kernel_table,
                              kernel_list)
            except Exception as exc:  # e.g. out of memory at one shape: keep the others
                rows.append({"shape": f"T{seqlen} HQ{q_heads} H{kv_heads}", **error_record(exc)})
            torch.cuda.empty_cache()
            save()


if __name__ == "__main__":
    main()
