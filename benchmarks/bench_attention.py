"""Gated window attention timed side by side with its peers: forward and forward+backward
ms and TFLOP/s, every row of a shape on the same inputs in one run.

    python benchmarks/bench_attention.py --out benchmarks/results             # every shape (GPU, minutes)
    python benchmarks/bench_attention.py --targets --out benchmarks/results   # the three target shapes (GPU)
    python benchmarks/bench_attention.py --quick --out /tmp/attention         # CPU logic check, no timing

Rows of a shape with peers (the five SHAPES; FlexAttention at the first three, the targets;
--targets: those three only):
  gatedfwa (gated)                            the op with g (its backward computes dg)
  gatedfwa SWA (g=None)                       the op without gate
  FlexAttention gated, gate detached (no dg)  flex_peers.gated_flex_attention with g detached:
                                              the same forward, a backward without dg
  FlexAttention gated, with dg                the same function with g requiring grad: the
                                              backward computes dg, as gatedfwa's does
  FlexAttention SWA (no gate)                 FlexAttention under the same block mask
  SDPA full causal                            all T(T+1)/2 pairs, counted as such
  fla parallel_forgetting_attn                (not with --targets) fla's gated window kernel
Both gated FlexAttention rows time the gates' cumulative sum inside the timed function,
compiled with FlexAttention as one function. The gated rows also give the relative
difference of their output (and, with dg, of dg) to gatedfwa's on the same inputs: the
check that they compute the same thing. gatedfwa alone (gated and not) runs at packed short
sequences (T = 32k), GQA 8:1 and T = 128k, except with --targets.

Ratios: each row's time over gatedfwa (gated)'s in the same shape, and the gate's cost (the
gated and ungated forward+backward of gatedfwa and of FlexAttention with dg timed alternately
over 5 rounds: median and spread). TFLOP/s count in-window pairs (common.attention_tflops).

FlexAttention compiles each of its functions at each shape (tens of seconds each); on a GPU
one process per FlexAttention shape first runs every row once, all at the same time, so
that the timing run finds the compiled kernels in torch.compile's and Triton's caches on
disk (--no-warm-parallel: compile in turn instead). Nothing is timed until they are done.

Writes attention_speed.json/.md, attention_speed_targets.* with --targets (the three shapes
only: attention_speed.* keeps every shape), attention_speed_quick.* with --quick; --name
sets another name. The files are rewritten after each shape, with "complete": false until
the last, so that a run stopped early keeps the shapes it finished; --budget-s S starts no
shape after S seconds and lists those it skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

import flex_peers  # noqa: E402
from attention_inputs import DEVICE, make_inputs, short_sequences  # noqa: E402
from common import attention_tflops, bench_ms, environment, measure_ceilings, window_pairs, write_results  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402

# B, T, H, D, window (HQ == H): the shapes timed beside the peers. The first three are the
# targets of docs/performance.md, timed beside every FlexAttention row.
SHAPES = [
    (4, 8192, 16, 128, 512),
    (4, 8192, 16, 128, 2048),
    (4, 8192, 16, 64, 512),
    (1, 32768, 16, 128, 2048),
    (8, 4096, 32, 64, 1024),
]
TARGET_SHAPES = SHAPES[:3]
FLEX_SHAPES = set(TARGET_SHAPES)  # FlexAttention compiles per shape: the targets only
# gatedfwa alone (gated and g=None) at shapes the peers above do not cover:
# B, T, HQ, H, D, window, varlen (many short sequences, packed).
MORE_SHAPES = [
    (1, 32768, 16, 16, 128, 512, True),
    (4, 8192, 32, 4, 128, 2048, False),
    (1, 131072, 16, 16, 128, 2048, False),
]
# --quick: tiny sizes, the same logic.
QUICK_SHAPES = [(1, 64, 2, 16, 16)]
QUICK_MORE_SHAPES = [(1, 64, 2, 1, 16, 16, True)]

OURS = "gatedfwa (gated)"
OURS_SWA = "gatedfwa SWA (g=None)"
FLEX_DETACHED = "FlexAttention gated, gate detached (no dg)"
FLEX_DG = "FlexAttention gated, with dg"
FLEX_SWA = "FlexAttention SWA (no gate)"
SDPA = "SDPA full causal (all T^2/2 pairs)"
FLA = "fla parallel_forgetting_attn"
# (gated, ungated) rows whose forward+backward are timed alternately for the gate's cost.
GATE_PAIRS = [(OURS, OURS_SWA), (FLEX_DG, FLEX_SWA)]
COLUMNS = ["shape", "implementation", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
           f"fwd ms / {OURS}", f"fwd+bwd ms / {OURS}", "gated / ungated fwd+bwd, interleaved",
           "o rel diff to gatedfwa", "dg rel diff to gatedfwa", "note", "error"]


def wall_ms(fn, grad_to_none=None) -> float:
    """One call's wall time in ms: the CPU stand-in for bench_ms (--quick: logic only)."""
    if grad_to_none:
        for x in grad_to_none:
            x.grad = None
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def relative_difference(x: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - reference|| / ||reference|| in float64."""
    x, reference = x.double(), reference.double()
    return ((x - reference).norm() / reference.norm().clamp_min(1e-30)).item()


class ShapeTimer:
    """The rows of one shape: each implementation's forward (no grad) and forward+backward
    timed on the shared inputs; a failure is recorded in its row and the run goes on."""

    def __init__(self, label, heads, head_dim, timer):
        self.label, self.heads, self.head_dim, self.timer = label, heads, head_dim, timer
        self.rows: list[dict] = []
        self.steps: dict = {}  # name -> (forward+backward step, leaves), for the gate's cost

    def record(self, name, forward, leaves, out_grad, pairs, note="", compare=None):
        """forward() -> output; leaves: the tensors whose .grad the backward fills; pairs:
        (query, key) pairs counted for TFLOP/s; compare() -> {column: value} after timing."""
        row = {"shape": self.label, "implementation": name, "note": note}
        try:
            with torch.no_grad():
                forward()  # compile / autotune outside the timing
                ms = self.timer(forward)
            row["fwd ms"] = ms
            row["fwd TFLOP/s"] = attention_tflops(pairs, self.heads, self.head_dim, ms, backward=False)

            def step():
                forward().backward(out_grad)

            step()
            ms = self.timer(step, grad_to_none=leaves)
            self.steps[name] = (step, leaves)
            row["fwd+bwd ms"] = ms
            row["fwd+bwd TFLOP/s"] = attention_tflops(pairs, self.heads, self.head_dim, ms, backward=True)
        except Exception as exc:  # a peer that fails is recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        if compare is not None:  # also where the backward failed: the forward may still agree
            try:
                row.update(compare())
            except Exception as exc:
                row["error"] = "; ".join(filter(None, [row.get("error"), f"compare: {type(exc).__name__}: {exc}"[:300]]))
        self.rows.append(row)
        print(row, flush=True)

    def add_gate_costs(self, rounds: int = 5) -> None:
        """The gate's cost to each implementation, measured robustly: its gated and ungated
        forward+backward timed alternately for `rounds` rounds (clock and host drift hit both
        alike); the gated row gets the median ratio and the spread of the rounds."""
        for gated, plain in GATE_PAIRS:
            if gated not in self.steps or plain not in self.steps:
                continue
            ratios = []
            for _ in range(rounds):
                gated_ms = self.timer(self.steps[gated][0], grad_to_none=self.steps[gated][1])
                plain_ms = self.timer(self.steps[plain][0], grad_to_none=self.steps[plain][1])
                ratios.append(gated_ms / plain_ms)
            for row in self.rows:
                if row["implementation"] == gated:
                    row["gated / ungated fwd+bwd, interleaved"] = (
                        f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")

    def add_ratios(self) -> None:
        """Each row's time over gatedfwa (gated)'s."""
        ours = next((row for row in self.rows if row["implementation"] == OURS), {})
        for row in self.rows:
            for part in ("fwd ms", "fwd+bwd ms"):
                if isinstance(row.get(part), float) and isinstance(ours.get(part), float):
                    row[f"{part} / {OURS}"] = row[part] / ours[part]


def time_shape(batch, seqlen, heads, head_dim, window, timer, include_peers=True, include_flex=True,
               include_fla=True, compile_flex=True, kv_heads=None, varlen=False):
    """Rows of the speed table for one shape; kv_heads (GQA) and varlen (short packed
    sequences, attention_inputs.short_sequences) for gatedfwa alone (include_peers False)."""
    kv_heads = heads if kv_heads is None else kv_heads
    q, k, v, g = make_inputs(batch, seqlen, heads, kv_heads, head_dim, requires_grad=True)
    do = torch.randn_like(q)
    cu, lengths = short_sequences(seqlen) if varlen else (None, [seqlen] * batch)
    pairs = window_pairs(lengths, window)
    label = f"B{batch} T{seqlen} H{heads} D{head_dim} w{window}"
    if kv_heads != heads or varlen:
        label = f"B{batch} T{seqlen} HQ{heads} H{kv_heads} D{head_dim} w{window}" + (
            f" varlen x{len(lengths)}" if varlen else "")
    shape = ShapeTimer(label, heads, head_dim, timer)

    def ours(gate):
        return lambda: gated_window_attention(q, k, v, gate, window_size=window, cu_seqlens=cu)

    shape.record(OURS, ours(g), [q, k, v, g], do, pairs)
    shape.record(OURS_SWA, ours(None), [q, k, v], do, pairs)
    if include_peers:
        time_peers(shape, q, k, v, g, do, window, pairs, include_flex, include_fla, compile_flex, ours)
    shape.add_gate_costs()
    shape.add_ratios()
    return shape.rows


def time_peers(shape, q, k, v, g, do, window, pairs, include_flex, include_fla, compile_flex, ours):
    """The peers' rows on the same q, k, v, g and output gradient (heads-first copies for
    FlexAttention and SDPA)."""
    batch, seqlen = q.shape[:2]
    qt, kt, vt = (flex_peers.to_heads_first(x) for x in (q, k, v))
    do_t = do.transpose(1, 2).contiguous()
    if include_flex:
        try:
            block_mask = flex_peers.sliding_window_block_mask(seqlen, window, q.device)
            prepare = flex_peers.compiled if compile_flex else (lambda fn: fn)
            gated, plain = prepare(flex_peers.gated_flex_attention), prepare(flex_peers.window_flex_attention)
            g_detached = g.detach()

            def same_output(flex_forward, reference_forward):
                def compare():
                    with torch.no_grad():
                        return {"o rel diff to gatedfwa": relative_difference(
                            flex_forward().transpose(1, 2), reference_forward())}
                return compare

            def same_output_and_dg():
                o = gated(qt, kt, vt, g, block_mask)
                (dg,) = torch.autograd.grad(o, g, do_t)
                o_ref = ours(g)()
                (dg_ref,) = torch.autograd.grad(o_ref, g, do)
                return {"o rel diff to gatedfwa": relative_difference(o.transpose(1, 2), o_ref),
                        "dg rel diff to gatedfwa": relative_difference(dg, dg_ref)}

            flex_detached = lambda: gated(qt, kt, vt, g_detached, block_mask)  # noqa: E731
            shape.record(FLEX_DETACHED, flex_detached, [qt, kt, vt], do_t, pairs,
                         note="gate cumsum inside the timed function; g detached: the backward computes no dg",
                         compare=same_output(flex_detached, ours(g)))
            shape.record(FLEX_DG, lambda: gated(qt, kt, vt, g, block_mask), [qt, kt, vt, g], do_t, pairs,
                         note="gate cumsum inside the timed function, compiled with it; the backward computes dg",
                         compare=same_output_and_dg)
            flex_swa = lambda: plain(qt, kt, vt, block_mask)  # noqa: E731
            shape.record(FLEX_SWA, flex_swa, [qt, kt, vt], do_t, pairs, compare=same_output(flex_swa, ours(None)))
        except Exception as exc:  # the block mask itself failed
            shape.rows.append({"shape": shape.label, "implementation": "FlexAttention",
                               "error": f"{type(exc).__name__}: {exc}"[:300]})
    sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # noqa: E731
    shape.record(SDPA, sdpa, [qt, kt, vt], do_t, window_pairs([seqlen] * batch, None),
                 note="counts all causal pairs")
    if include_fla:
        try:
            from fla.ops.forgetting_attn import parallel_forgetting_attn
        except ImportError:
            shape.rows.append({"shape": shape.label, "implementation": FLA, "error": "not installed"})
            return
        gf = g.detach().float().requires_grad_()
        shape.record(FLA, lambda: parallel_forgetting_attn(q, k, v, gf, window_size=window), [q, k, v, gf], do, pairs)


def call_once(fn, grad_to_none=None) -> float:
    """The timer of a warming run: one call (compiles whatever fn compiles), no timing."""
    fn()
    return 1.0


def warm_command(shape, quick=False) -> list[str]:
    """The command line of the process that warms one shape."""
    return [sys.executable, str(Path(__file__).resolve()), "--warm", *map(str, shape)] + (["--quick"] if quick else [])


def warm_in_parallel(shapes, quick=False, timeout_s=300.0) -> list[dict]:
    """Run each peer shape's rows once (this script with --warm) in processes of their own,
    all at the same time, and wait for them: torch.compile and Triton keep what they compile
    in caches on disk, which the timing run then reads instead of compiling in turn. Returns
    each process's shape, exit status and seconds; a failure only costs the time."""
    started = time.time()
    processes = []
    for shape in shapes:
        command = warm_command(shape, quick)
        log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the process
        processes.append((shape, log, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)))
    records = []
    for shape, log, process in processes:
        try:
            status = process.wait(timeout=max(1.0, timeout_s - (time.time() - started)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            status = "timed out"
        record = {"shape": list(shape), "returncode": status, "seconds": time.time() - started}
        if status != 0:
            log.seek(0)
            record["stderr tail"] = log.read()[-500:]
        log.close()
        records.append(record)
        print("warm", record, flush=True)
    return records


def warm_shape(shape):
    """--warm: one shape's peer rows, each run once (call_once), FlexAttention compiled."""
    with flex_peers.unfused_backward_on_cpu() if DEVICE == "cpu" else contextlib.nullcontext():
        time_shape(*shape, timer=call_once, include_fla=False, compile_flex=DEVICE == "cuda")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    parser.add_argument("--targets", action="store_true",
                        help="the three target shapes only, beside gatedfwa's ungated op, FlexAttention (gate "
                             "detached, with dg, SWA) and SDPA; no fla, no gatedfwa-only shapes")
    parser.add_argument("--no-peers", action="store_true", help="time gatedfwa only")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, CPU logic check: no meaningful timings")
    parser.add_argument("--name", help="results file name without extension (default: attention_speed, "
                                       "attention_speed_targets with --targets, attention_speed_quick with --quick)")
    parser.add_argument("--no-warm-parallel", action="store_true",
                        help="compile FlexAttention shape by shape in this process, not first in parallel")
    parser.add_argument("--budget-s", type=float,
                        help="start no shape after this many seconds (the warming included); the files then say "
                             "complete: false and list the shapes skipped")
    parser.add_argument("--warm", nargs=5, type=int, metavar=("B", "T", "H", "D", "W"), help=argparse.SUPPRESS)
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    if args.warm:  # a warming process of warm_in_parallel: compiles, measures and writes nothing
        flex_peers.allow_recompiles()
        warm_shape(tuple(args.warm))
        return
    provenance.settle_or_exit(parser, args, strict=not args.quick)
    if DEVICE != "cuda" and not args.quick:
        parser.error("a CUDA GPU is required (--quick runs on the CPU)")
    name = args.name or ("attention_speed_quick" if args.quick else
                         "attention_speed_targets" if args.targets else "attention_speed")
    flex_peers.allow_recompiles()
    env = environment()
    print(env, flush=True)
    timer = bench_ms if DEVICE == "cuda" else wall_ms
    ceilings = measure_ceilings() if DEVICE == "cuda" and not args.quick else {}
    print(ceilings, flush=True)

    peer_shapes = QUICK_SHAPES if args.quick else TARGET_SHAPES if args.targets else SHAPES
    alone_shapes = [] if args.targets else QUICK_MORE_SHAPES if args.quick else MORE_SHAPES
    jobs = [(shape, dict(include_peers=not args.no_peers, include_flex=args.quick or shape in FLEX_SHAPES,
                         include_fla=not args.targets, compile_flex=DEVICE == "cuda"))
            for shape in peer_shapes]
    jobs += [((batch, seqlen, q_heads, head_dim, window), dict(include_peers=False, kv_heads=kv_heads, varlen=varlen))
             for batch, seqlen, q_heads, kv_heads, head_dim, window, varlen in alone_shapes]
    started = time.time()
    flex_shapes = [shape for shape, options in jobs if options.get("include_peers") and options.get("include_flex")]
    warmed = []
    if DEVICE == "cuda" and not args.no_warm_parallel and len(flex_shapes) > 1:
        # The warming may take half the budget; the shapes it leaves uncompiled compile below.
        warmed = warm_in_parallel(flex_shapes, quick=args.quick,
                                  timeout_s=300.0 if args.budget_s is None else args.budget_s / 2)

    def write(rows, done, skipped):
        payload = {"environment": env, "quick": args.quick, "targets": args.targets,
                   "complete": done == len(jobs), "skipped_shapes": skipped, "budget_s": args.budget_s,
                   "seconds": time.time() - started, "warm_parallel": warmed, "ceilings": ceilings, "rows": rows,
                   "flops": "in-window pairs P: fwd 4*B*HQ*P*D, fwd+bwd 3.5x (SDPA: all causal pairs)"}
        write_results(args.out, name, payload, rows, COLUMNS)
        print(f"{done}/{len(jobs)} shapes in {time.time() - started:.0f} s", flush=True)

    # On the CPU (--quick) FlexAttention runs unfused, its backward included: logic only.
    with flex_peers.unfused_backward_on_cpu() if DEVICE == "cpu" else contextlib.nullcontext():
        run_jobs(jobs, timer, write, deadline=None if args.budget_s is None else started + args.budget_s)


def run_jobs(jobs, timer, write, deadline=None):
    """Time each job's shape (time_shape(*shape, **options)); write(rows so far, shapes done,
    shapes skipped) after each, so that a run stopped early keeps what it finished. No shape
    starts after `deadline` (time.time()); those left are written as skipped."""
    rows = []
    for done, (shape, options) in enumerate(jobs, start=1):
        if deadline is not None and time.time() > deadline:
            write(rows, done - 1, [list(job[0]) for job in jobs[done - 1:]])
            return
        rows.extend(time_shape(*shape, timer=timer, **options))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        write(rows, done, [])


if __name__ == "__main__":
    main()
