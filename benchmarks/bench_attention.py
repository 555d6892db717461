"""Gated window attention on a GPU: correctness at full sizes, then timing side by side with
the peers that are installed (FlexAttention with the same gated math, FlexAttention SWA,
SDPA full causal, fla's parallel_forgetting_attn).

    python benchmarks/bench_attention.py --out benchmarks/results            # check + time
    python benchmarks/bench_attention.py --out /tmp/x --only check            # one part
    python benchmarks/bench_attention.py --out /tmp/x --only sweep            # kernel configurations

The sweep checks every candidate configuration of each kernel (tile sizes, Hopper tensor
descriptors, warp specialisation) against the float64 reference at a small shape, times each
kernel of one forward+backward per candidate (device time, torch.profiler), prints the best
per kernel, head size and gate, times the winners against launch.py's choice at the target
shapes and at packed varlen, GQA 8:1 and T=128k shapes, and writes attention_sweep.*,
attention_sweep_best.* and tuned.py (the launch table: copy it to
gatedfwa/ops/window_attention/tuned.py, or run sweep_to_configs.py on the JSON).

Writes attention_check.json/.md and attention_speed.json/.md (GPU name, versions, commit).
The speed table also gives, for gatedfwa and FlexAttention, the gate's cost measured with
the gated and ungated forward+backward timed alternately over 5 rounds (median, spread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import (  # noqa: E402
    attention_tflops, bench_ms, environment, kernel_device_ms, measure_ceilings, window_pairs, write_results,
)

from gatedfwa import gated_window_attention  # noqa: E402
from gatedfwa.ops.window_attention import launch  # noqa: E402
from gatedfwa.ops.window_attention.fused_gate import _fused_gate_attention as fused_gate_attention  # noqa: E402
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention  # noqa: E402
from gatedfwa.ops.window_attention.torch_path import chunked_gated_window_attention  # noqa: E402

DEVICE = "cuda"


def make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype=torch.bfloat16, gate=True, requires_grad=False):
    q = torch.randn(batch, seqlen, q_heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    # Gates as in the side-by-side comparisons with the peers: logsigmoid(N(0, 1) + 3), mean about -0.07.
    g = F.logsigmoid(torch.randn(batch, seqlen, q_heads, device=DEVICE) + 3) if gate else None
    if requires_grad:
        for x in (q, k, v, g):
            if x is not None:
                x.requires_grad_()
    return q, k, v, g


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------
# Correctness at full size
# --------------------------------------------------------------------------------------

CHECKS = [
    # name, B, T, HQ, H, D, window, varlen
    ("T32k D128 w2048", 1, 32768, 16, 16, 128, 2048, False),
    ("T8k GQA4 D64 w512", 2, 8192, 16, 4, 64, 512, False),
    ("varlen T32k D128 w1024", 1, 32768, 8, 8, 128, 1024, True),
    ("T4k D100 w300 MQA", 2, 4096, 8, 1, 100, 300, False),
    ("T4k D256 full causal", 1, 4096, 4, 4, 256, None, False),
]


def random_cu_seqlens(total, pieces, generator=None):
    cuts = torch.randperm(total - 1, generator=generator)[: pieces - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([total])])
    return bounds.to(torch.int32).to(DEVICE)


def check_full_size(name, batch, seqlen, q_heads, kv_heads, head_dim, window, varlen):
    """Outputs and all gradients against a float64 chunked reference (same math, exact to
    ~1e-15). Reports relative L2 errors, next to the error of merely rounding the float64
    answer to bf16 (the floor any bf16 kernel sits on)."""
    q, k, v, g = make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, requires_grad=True)
    cu = random_cu_seqlens(seqlen, 7) if varlen else None
    do = torch.randn_like(q)
    o = gated_window_attention(q, k, v, g, window_size=window, cu_seqlens=cu)
    grads = torch.autograd.grad(o, (q, k, v, g), do)
    o = o.detach()
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v, g)]
    ref_o, _ = chunked_gated_window_attention(*ref_inputs, window_size=window, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(ref_o, ref_inputs, do.double())
    row = {"check": name}
    ok = True
    for label, x, ref in zip(("o", "dq", "dk", "dv", "dg"), (o, *grads), (ref_o.detach(), *ref_grads)):
        err = relative_error(x, ref)
        floor = relative_error(ref.to(torch.bfloat16), ref)
        finite = bool(torch.isfinite(x).all())
        row[f"{label} rel err"] = err
        row[f"{label} bf16 floor"] = floor
        # A bf16 kernel lands within a small multiple of the bf16 rounding floor.
        ok &= finite and err <= max(4 * floor, 1e-3)
    row["ok"] = ok
    del ref_inputs, ref_o, ref_grads
    torch.cuda.empty_cache()
    return row


def check_long_sequence():
    """T = 2^20 in one sequence, gates around -0.01, float32: error of o and of dg at the last
    1000 positions against the first 1000 (float64 references on slices with one window of
    context each side, exact for the slice; decay differences are shift invariant). dg is a
    reverse cumulative sum over the whole sequence, so its rounding would pile up towards
    the start."""
    seqlen, window, head_dim = 2**20, 256, 64
    q, k, v, _ = make_inputs(1, seqlen, 2, 2, head_dim, dtype=torch.float32, gate=False)
    g = (-0.01 * (1 + 0.5 * torch.rand(1, seqlen, 2, device=DEVICE))).requires_grad_()
    do = torch.randn_like(q)
    o = gated_window_attention(q, k, v, g, window_size=window)
    (dg,) = torch.autograd.grad(o, g, do)
    o = o.detach()

    def errors_of(start, stop):
        lo, hi = max(start - window, 0), min(stop + window, seqlen)
        pieces = [x[:, lo:hi].detach().double().requires_grad_() for x in (q, k, v, g)]
        ref, _ = naive_gated_window_attention(*pieces, window_size=window)
        (dg_ref,) = torch.autograd.grad(ref, pieces[3], do[:, lo:hi].double())
        o_err = (o[:, start:stop].double() - ref[:, start - lo:stop - lo]).abs().max().item()
        dg_err = (dg[:, start:stop].double() - dg_ref[:, start - lo:stop - lo]).abs().max().item()
        return o_err, dg_err

    (o_head, dg_head), (o_tail, dg_tail) = errors_of(0, 1000), errors_of(seqlen - 1000, seqlen)
    return {"check": "T=2^20 fp32 gates~-0.01 w256", "first 1000 max err": o_head, "last 1000 max err": o_tail,
            "dg first 1000 max err": dg_head, "dg last 1000 max err": dg_tail,
            "ok": o_tail <= 2 * o_head + 1e-6 and dg_head <= 2 * dg_tail + 1e-6}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

SHAPES = [
    # B, T, H, D, window (HQ == H, the shapes the peers were measured at)
    (4, 8192, 16, 128, 512),
    (4, 8192, 16, 128, 2048),
    (4, 8192, 16, 64, 512),
    (1, 32768, 16, 128, 2048),
    (8, 4096, 32, 64, 1024),
]
# gatedfwa alone (gated and g=None) at shapes the peers above do not cover:
# B, T, HQ, H, D, window, varlen (many short sequences, packed).
MORE_SHAPES = [
    (1, 32768, 16, 16, 128, 512, True),
    (4, 8192, 32, 4, 128, 2048, False),
    (1, 131072, 16, 16, 128, 2048, False),
]


def short_sequences(total: int):
    """cu_seqlens of sequences of 256-2048 tokens (a fixed draw) packed into total tokens, and
    their lengths."""
    cuts = [0]
    generator = torch.Generator().manual_seed(0)
    while cuts[-1] < total:
        cuts.append(min(total, cuts[-1] + int(torch.randint(256, 2049, (1,), generator=generator))))
    return torch.tensor(cuts, dtype=torch.int32, device=DEVICE), [b - a for a, b in zip(cuts, cuts[1:])]


def flex_variants(q, k, v, g, window):
    """FlexAttention callables: same gated math (score_mod adds U[q] - U[k], U a global fp32
    cumulative sum) under a sliding block mask, and plain SWA. Inputs [B, H, T, D]."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    seqlen = q.shape[1]

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(sliding, B=None, H=None, Q_LEN=seqlen, KV_LEN=seqlen, device=DEVICE)
    qt, kt, vt = (x.transpose(1, 2).contiguous().detach().requires_grad_(x.requires_grad) for x in (q, k, v))
    cumulative = g.float().cumsum(1).transpose(1, 2).contiguous()  # [B, H, T]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (cumulative[b, h, q_idx] - cumulative[b, h, kv_idx])

    gated = lambda: flex(qt, kt, vt, score_mod=score_mod, block_mask=block_mask)  # noqa: E731
    plain = lambda: flex(qt, kt, vt, block_mask=block_mask)  # noqa: E731
    return gated, plain, (qt, kt, vt)


GATE_PAIRS = [("gatedfwa (gated)", "gatedfwa SWA (g=None)"),
              ("FlexAttention (same gated math)", "FlexAttention SWA (no gate)")]


def add_gate_costs(rows, steps, rounds: int = 5) -> None:
    """The gate's cost to each implementation, measured robustly: its gated and ungated
    forward+backward timed alternately for `rounds` rounds (clock and host drift hit both
    alike); the gated row gets the median ratio and the spread of the rounds."""
    for gated, plain in GATE_PAIRS:
        if gated not in steps or plain not in steps:
            continue
        ratios = []
        for _ in range(rounds):
            gated_ms = bench_ms(steps[gated][0], grad_to_none=steps[gated][1])
            plain_ms = bench_ms(steps[plain][0], grad_to_none=steps[plain][1])
            ratios.append(gated_ms / plain_ms)
        for row in rows:
            if row["implementation"] == gated:
                row["gated / ungated fwd+bwd, interleaved"] = (
                    f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


def time_shape(batch, seqlen, heads, head_dim, window, include_peers=True, include_flex=True, kv_heads=None,
               varlen=False):
    """Rows of the speed table for one shape; kv_heads (GQA) and varlen (short packed sequences,
    short_sequences) for gatedfwa alone (include_peers False)."""
    kv_heads = heads if kv_heads is None else kv_heads
    q, k, v, g = make_inputs(batch, seqlen, heads, kv_heads, head_dim, requires_grad=True)
    do = torch.randn_like(q)
    cu, lengths = short_sequences(seqlen) if varlen else (None, [seqlen] * batch)
    pairs = window_pairs(lengths, window)
    full_pairs = window_pairs([seqlen] * batch, None)
    rows = []
    steps = {}  # name -> (forward+backward step, leaves), for the interleaved gate cost
    label = f"B{batch} T{seqlen} H{heads} D{head_dim} w{window}"
    if kv_heads != heads or varlen:
        label = f"B{batch} T{seqlen} HQ{heads} H{kv_heads} D{head_dim} w{window}" + (
            f" varlen x{len(lengths)}" if varlen else "")

    def record(name, fwd, leaves, out_grad, pairs_counted, note=""):
        row = {"shape": label, "implementation": name, "note": note}
        try:
            fwd()  # compile / autotune outside the timing
            torch.cuda.synchronize()
            with torch.no_grad():
                ms = bench_ms(fwd)
            row["fwd ms"] = ms
            row["fwd TFLOP/s"] = attention_tflops(pairs_counted, heads, head_dim, ms, backward=False)

            def step():
                out = fwd()
                out.backward(out_grad)

            step()
            ms = bench_ms(step, grad_to_none=leaves)
            steps[name] = (step, leaves)
            row["fwd+bwd ms"] = ms
            row["fwd+bwd TFLOP/s"] = attention_tflops(pairs_counted, heads, head_dim, ms, backward=True)
        except Exception as exc:  # a peer that fails is recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        rows.append(row)
        print(row, flush=True)

    record("gatedfwa (gated)", lambda: gated_window_attention(q, k, v, g, window_size=window, cu_seqlens=cu),
           [q, k, v, g], do, pairs)
    record("gatedfwa SWA (g=None)", lambda: gated_window_attention(q, k, v, None, window_size=window, cu_seqlens=cu),
           [q, k, v], do, pairs)
    if not include_peers:
        add_gate_costs(rows, steps)
        return rows
    try:
        gated, plain, leaves = flex_variants(q, k, v, g.detach(), window)
        do_t = do.transpose(1, 2).contiguous()
        if include_flex:
            record("FlexAttention (same gated math)", gated, list(leaves), do_t, pairs)
            record("FlexAttention SWA (no gate)", plain, list(leaves), do_t, pairs)
        qt, kt, vt = leaves
        sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # noqa: E731
        record("SDPA full causal (all T^2/2 pairs)", sdpa, list(leaves), do_t, full_pairs, note="counts all causal pairs")
    except Exception as exc:
        rows.append({"implementation": "FlexAttention/SDPA", "error": f"{type(exc).__name__}: {exc}"[:300]})
    add_gate_costs(rows, steps)
    try:
        from fla.ops.forgetting_attn import parallel_forgetting_attn

        gf = g.detach().float().requires_grad_()
        record("fla parallel_forgetting_attn", lambda: parallel_forgetting_attn(q, k, v, gf, window_size=window),
               [q, k, v, gf], do, pairs)
    except ImportError:
        rows.append({"implementation": "fla", "error": "not installed"})
    return rows


# --------------------------------------------------------------------------------------
# Tile-size sweep
# --------------------------------------------------------------------------------------

def _candidate(m, n, warps, stages, tma=False):
    config = dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
    if tma:
        config["USE_TMA"] = True
    return config


def candidate_label(config: dict) -> str:
    label = f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}"
    return label + (" tma" if config.get("USE_TMA") else "")


# Candidates per kernel besides launch.py's current choice. "tma": tiles through tensor
# descriptors. Compiled offline for sm_90 (benchmarks/kernel_instructions.py), D = 128 with the
# gate: dk/dv 64x64 w4 (the default) spills (255 registers, ~250 bytes of local stores),
# 64x64 w8 and 32x64 w4 do not. (Warp specialisation of the unmasked loop was a candidate:
# Triton 3.6's Hopper pass crashes on it at 4 warps, and at 8 warps, compiled without a
# producer/consumer split, it was the slowest forward: attention_sweep.md, docs/performance.md.)
SWEEP = {
    "forward": [_candidate(*c) for c in [
        (64, 64, 4, 3, True), (128, 64, 8, 3), (128, 64, 8, 3, True), (128, 128, 8, 3, True),
        (128, 128, 8, 2, True), (64, 32, 4, 4, True), (128, 64, 4, 3, True)]],
    "dq": [_candidate(*c) for c in [
        (64, 64, 4, 2, True), (64, 64, 4, 3, True), (128, 64, 8, 2, True), (64, 32, 4, 3, True),
        (128, 32, 8, 3, True)]],
    "dkdv": [_candidate(*c) for c in [
        (64, 64, 8, 2), (64, 64, 8, 2, True), (32, 64, 4, 3), (32, 64, 4, 3, True), (64, 64, 4, 2, True),
        (64, 128, 8, 2, True)]],
}
# The sweep's timing shapes (B, T, H, D, window) and the correctness shape of each head size,
# B=1 T=1024 H=16 w=320: the integer arguments keep the divisibility of the timing shapes, so
# Triton reuses the kernels compiled for the check.
SWEEP_SHAPES = [(4, 8192, 16, 128, 512), (4, 8192, 16, 128, 2048), (4, 8192, 16, 64, 512)]
# Targets of issue 16 in TFLOP/s over in-window pairs (forward, forward+backward), gated.
TARGETS = {(128, 2048): (450, 400), (128, 512): (330, 290), (64, 512): (260, 230)}
KERNEL_NAMES = {"forward": "_forward_kernel", "dq": "_dq_kernel", "dkdv": "_dkdv_kernel"}
CHECK_SEQLEN, CHECK_HEADS, CHECK_WINDOW = 1024, 16, 320


def _use_configs(defaults, overrides):
    """Point launch.CONFIGS at defaults with the given {kernel: {(block_d, gate): config}} on top."""
    launch.CONFIGS.update(defaults)
    for kernel, table in overrides.items():
        def config_of(head_dim, has_gate=True, table=table, fallback=defaults[kernel]):
            chosen = table.get((launch.block_d_for(head_dim), has_gate))
            return dict(chosen) if chosen is not None else fallback(head_dim, has_gate)
        launch.CONFIGS[kernel] = config_of


def _step(q, k, v, g, do, window, cu_seqlens=None):
    """One forward+backward through the public op (gate sums included)."""
    def step():
        o = gated_window_attention(q, k, v, g, window_size=window, cu_seqlens=cu_seqlens)
        o.backward(do)
    return step


def check_variant(head_dim, gate):
    """The op under the current launch.CONFIGS against the naive float64 reference, with the
    rule of docs/correctness.md (bf16; the naive path in bf16 gives the bound). Returns "ok" or
    the failure."""
    from gatedfwa.testing import assert_within_rule, float32_slack

    q, k, v, g = make_inputs(1, CHECK_SEQLEN, CHECK_HEADS, CHECK_HEADS, head_dim, gate=gate)
    do = torch.randn_like(q)
    window = CHECK_WINDOW

    def outputs(fn, inputs):
        leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
        o = fn(*leaves)
        return [o.detach(), *torch.autograd.grad(o, [x for x in leaves if x is not None], do.to(o.dtype))]

    def naive(q, k, v, g):
        return naive_gated_window_attention(q, k, v, g, window_size=window)[0]

    fast = outputs(lambda q, k, v, g: gated_window_attention(q, k, v, g, window_size=window), (q, k, v, g))
    low = outputs(naive, (q, k, v, g))
    ref = outputs(naive, [None if x is None else x.double() for x in (q, k, v, g)])
    try:
        for name, a, b, c in zip(("o", "dq", "dk", "dv", "dg"), fast, low, ref):
            assert_within_rule(name, a, b, c, atol=float32_slack(c, q.dtype))
    except AssertionError as exc:
        return str(exc)[:200]
    return "ok"


def _kernel_times(step) -> dict:
    times = kernel_device_ms(step, iterations=10)
    row = {}
    for kernel, name in KERNEL_NAMES.items():
        row[f"{kernel} ms"] = sum(ms for key, ms in times.items() if name in key)
    if not row["forward ms"] or not row["dkdv ms"]:
        raise RuntimeError(f"the profiler named no attention kernel: {sorted(times)}")
    row["step kernels ms"] = sum(times.values())
    return row


def sweep(shapes=SWEEP_SHAPES, budget_s: float = 270.0):
    """For every kernel, head size, gate setting and candidate (the other kernels at launch.py's
    choice): a correctness check at a small shape, then the device time of each kernel of one
    forward+backward at each timing shape (torch.profiler). Candidates past budget_s are
    recorded as skipped. Returns (rows, best): best maps (kernel, BLOCK_D, gate) to the winner
    (sweep_to_configs.best_configs)."""
    from sweep_to_configs import best_configs

    started = time.time()
    rows = []
    defaults = dict(launch.CONFIGS)
    head_dims = sorted({shape[3] for shape in shapes}, reverse=True)  # D = 128 first: two of the targets
    for head_dim in head_dims:
        for gate in (True, False):
            for kernel, candidates in SWEEP.items():
                default = dict(defaults[kernel](head_dim, gate))
                for config in [default] + [c for c in candidates if c != default]:
                    base = {"kernel": kernel, "head_dim": head_dim, "gate": gate, "config": config,
                            "candidate": candidate_label(config) + (" (default)" if config is default else "")}
                    if time.time() - started > budget_s:
                        rows.append({**base, "check": "skipped: time budget"})
                        continue
                    _use_configs(defaults, {kernel: {(launch.block_d_for(head_dim), gate): config}})
                    try:
                        check = check_variant(head_dim, gate)
                    except Exception as exc:
                        check = f"{type(exc).__name__}: {exc}"[:200]
                    for batch, seqlen, heads, shape_d, window in shapes:
                        if shape_d != head_dim:
                            continue
                        row = {**base, "shape": f"B{batch} T{seqlen} H{heads} D{head_dim} w{window}",
                               "window": window, "check": check}
                        if check == "ok":
                            try:
                                q, k, v, g = make_inputs(batch, seqlen, heads, heads, head_dim, gate=gate,
                                                         requires_grad=True)
                                row.update(_kernel_times(_step(q, k, v, g, torch.randn_like(q), window)))
                                row["kernel_ms"] = row[f"{kernel} ms"]
                                pairs = window_pairs([seqlen] * batch, window)
                                share = 1.0 if kernel == "forward" else 1.25  # of the backward's 2.5
                                row["kernel TFLOP/s"] = 4 * heads * pairs * head_dim * share / row["kernel_ms"] / 1e9
                            except Exception as exc:
                                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                        rows.append(row)
                        print({key: row.get(key) for key in ("shape", "gate", "kernel", "candidate", "check",
                                                           "kernel_ms", "kernel TFLOP/s")}, flush=True)
    launch.CONFIGS.update(defaults)
    return rows, best_configs(rows)


def time_best(best, shapes, label):
    """Forward and forward+backward TFLOP/s of launch.py's configurations against the sweep's
    winners (in memory), gated and not, at each shape (B, T, HQ, H, D, window, varlen)."""
    rows = []
    defaults = dict(launch.CONFIGS)
    overrides = {}
    for (kernel, block_d, gate), config in best.items():
        overrides.setdefault(kernel, {})[(block_d, gate)] = config
    for batch, seqlen, q_heads, kv_heads, head_dim, window, varlen in shapes:
        gated_rows = {}  # configs -> the gated row of this shape, for the gate's cost
        for gate in (True, False):
            q, k, v, g = make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, gate=gate, requires_grad=True)
            do = torch.randn_like(q)
            cu = None
            lengths = [seqlen] * batch
            if varlen:  # many short sequences: lengths 256-2048
                cu, lengths = short_sequences(seqlen)
            pairs = window_pairs(lengths, window)
            for which, table in (("launch.py", {}), ("sweep best", overrides)):
                _use_configs(defaults, table)
                row = {"part": label, "shape": f"B{batch} T{seqlen} HQ{q_heads} H{kv_heads} D{head_dim} w{window}"
                       + (f" varlen x{len(lengths)}" if varlen else ""), "gate": gate, "configs": which}
                try:
                    forward = lambda: gated_window_attention(q, k, v, g, window_size=window, cu_seqlens=cu)  # noqa: E731
                    with torch.no_grad():
                        forward()
                        ms = bench_ms(forward)
                    row["fwd ms"], row["fwd TFLOP/s"] = ms, attention_tflops(pairs, q_heads, head_dim, ms, backward=False)
                    step = _step(q, k, v, g, do, window, cu)
                    step()
                    ms = bench_ms(step, grad_to_none=[x for x in (q, k, v, g) if x is not None])
                    row["fwd+bwd ms"], row["fwd+bwd TFLOP/s"] = ms, attention_tflops(pairs, q_heads, head_dim, ms,
                                                                                    backward=True)
                    target = TARGETS.get((head_dim, window)) if not varlen and kv_heads == q_heads else None
                    if target and gate:
                        row["target fwd / fwd+bwd"] = f"{target[0]} / {target[1]}"
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                gated_row = gated_rows.get(which) if not gate else None
                if gated_row is not None and "fwd+bwd ms" in gated_row and "fwd+bwd ms" in row:
                    gated_row["gated / ungated fwd+bwd"] = gated_row["fwd+bwd ms"] / row["fwd+bwd ms"]
                gated_rows[which] = row
                rows.append(row)
                print(row, flush=True)
            del q, k, v, g, do
            torch.cuda.empty_cache()
    launch.CONFIGS.update(defaults)
    return rows


# Shapes timed after the sweep with its winners (B, T, HQ, H, D, window, varlen): the three
# targets, then packed varlen, GQA 8:1 and T = 128k.
BEST_SHAPES = [(4, 8192, 16, 16, 128, 512, False), (4, 8192, 16, 16, 128, 2048, False),
               (4, 8192, 16, 16, 64, 512, False), (1, 32768, 16, 16, 128, 512, True),
               (4, 8192, 32, 4, 128, 2048, False), (1, 131072, 16, 16, 128, 2048, False)]


def profile_kernels(batch=4, seqlen=8192, heads=16, head_dim=128, window=2048):
    """Time of each CUDA kernel in one forward+backward (torch.profiler), gated and ungated:
    where the gate's cost goes."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name in ("gated, from g", "gated, fused from gate_pre", "no gate"):
        q, k, v, g = make_inputs(batch, seqlen, heads, heads, head_dim, gate=name != "no gate", requires_grad=True)
        do = torch.randn_like(q)
        gate_pre = torch.randn(batch, seqlen, 2 * heads, device="cuda", dtype=q.dtype, requires_grad=True)
        gate_bias = torch.full((heads,), 3.0, device="cuda", dtype=q.dtype, requires_grad=True)

        def step():
            if name == "gated, fused from gate_pre":
                o, _ = fused_gate_attention(q, k, v, gate_pre, gate_bias, window, head_dim**-0.5, None)
            else:
                o = gated_window_attention(q, k, v, g, window_size=window)
            o.backward(do)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        for event in prof.key_averages():
            total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if total_us and event.key.startswith("_"):
                rows.append({"variant": name, "kernel": event.key[:60], "calls": event.count // 10,
                             "ms per step": total_us / 10 / 1000})
                print(rows[-1], flush=True)
        leaves = [x for x in (q, k, v, g, gate_pre, gate_bias) if x is not None]
        rows.append({"variant": name, "kernel": "fwd+bwd (do_bench)", "ms per step": bench_ms(step, grad_to_none=leaves)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    parser.add_argument("--only", choices=["check", "speed", "sweep", "profile"], help="run one part only")
    parser.add_argument("--no-peers", action="store_true", help="time gatedfwa only")
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    provenance.settle_or_exit(parser, args)
    if not torch.cuda.is_available():
        parser.error("a CUDA GPU is required")
    env = environment()
    print(env, flush=True)

    if args.only in (None, "check"):
        started = time.time()
        rows = []
        for spec in CHECKS:
            try:
                rows.append(check_full_size(*spec))
            except Exception as exc:
                rows.append({"check": spec[0], "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
                traceback.print_exc()
            print(rows[-1], flush=True)
        rows.append(check_long_sequence())
        print(rows[-1], flush=True)
        columns = ["check", "ok"] + [f"{n} {m}" for n in ("o", "dq", "dk", "dv", "dg") for m in ("rel err", "bf16 floor")]
        columns += ["first 1000 max err", "last 1000 max err", "dg first 1000 max err", "dg last 1000 max err", "error"]
        write_results(args.out, "attention_check", {"environment": env, "checks": rows,
                                                     "seconds": time.time() - started}, rows, columns)

    if args.only in (None, "speed"):
        ceilings = measure_ceilings()
        print(ceilings, flush=True)
        rows = []
        for i, shape in enumerate(SHAPES):
            # FlexAttention compiles per shape (about a minute each): only the two main shapes.
            rows.extend(time_shape(*shape, include_peers=not args.no_peers, include_flex=i < 2))
            torch.cuda.empty_cache()
        for batch, seqlen, q_heads, kv_heads, head_dim, window, varlen in MORE_SHAPES:
            rows.extend(time_shape(batch, seqlen, q_heads, head_dim, window, include_peers=False, kv_heads=kv_heads,
                                   varlen=varlen))
            torch.cuda.empty_cache()
        columns = ["shape", "implementation", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
                   "gated / ungated fwd+bwd, interleaved", "note", "error"]
        write_results(args.out, "attention_speed", {"environment": env, "ceilings": ceilings, "rows": rows,
                                                     "flops": "in-window pairs P: fwd 4*B*HQ*P*D, fwd+bwd 3.5x"},
                      rows, columns)

    if args.only == "profile":
        rows = profile_kernels()
        write_results(args.out, "attention_profile", {"environment": env, "rows": rows}, rows,
                      ["variant", "kernel", "calls", "ms per step"])

    if args.only == "sweep":
        from sweep_to_configs import table_source

        started = time.time()
        rows, best = sweep()
        timed = time_best(best, BEST_SHAPES, "after sweep")
        best_rows = [{"kernel": kernel, "BLOCK_D": block_d, "gate": gate, "winner": candidate_label(config)}
                     for (kernel, block_d, gate), config in sorted(best.items())]
        print("best per kernel, head size and gate:", flush=True)
        for row in best_rows:
            print(row, flush=True)
        write_results(args.out, "attention_sweep", {"environment": env, "rows": rows, "seconds": time.time() - started},
                      rows, ["shape", "gate", "kernel", "candidate", "check", "forward ms", "dq ms", "dkdv ms",
                             "step kernels ms", "kernel TFLOP/s", "error"])
        write_results(args.out, "attention_sweep_best", {"environment": env, "best": best_rows, "timed": timed},
                      best_rows + timed, ["kernel", "BLOCK_D", "gate", "winner", "shape", "configs", "fwd ms",
                                          "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "gated / ungated fwd+bwd",
                                          "target fwd / fwd+bwd", "error"])
        (Path(args.out) / "tuned.py").write_text(table_source(best, env))
        print(f"sweep done in {time.time() - started:.0f} s; launch table candidate: {args.out}/tuned.py", flush=True)


if __name__ == "__main__":
    main()
