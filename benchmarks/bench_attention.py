"""Gated window attention on a GPU: correctness at full sizes, then timing side by side with
the peers that are installed (FlexAttention with the same gated math, FlexAttention SWA,
SDPA full causal, fla's parallel_forgetting_attn).

    python benchmarks/bench_attention.py --out benchmarks/results            # check + time
    python benchmarks/bench_attention.py --out /tmp/x --only check            # one part
    python benchmarks/bench_attention.py --out /tmp/x --only sweep            # tile sizes

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

from common import attention_tflops, bench_ms, environment, measure_ceilings, window_pairs, write_results  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402
from gatedfwa.ops.gate.chunk_sums import chunk_gate_sums  # noqa: E402
from gatedfwa.ops.window_attention import launch  # noqa: E402
from gatedfwa.ops.window_attention.backward import attention_backward  # noqa: E402
from gatedfwa.ops.window_attention.forward import attention_forward  # noqa: E402
from gatedfwa.ops.window_attention.fused_gate import _fused_gate_attention as fused_gate_attention  # noqa: E402
from gatedfwa.ops.window_attention.reference import chunked_gated_window_attention, naive_gated_window_attention  # noqa: E402

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


def time_shape(batch, seqlen, heads, head_dim, window, include_peers=True, include_flex=True):
    q, k, v, g = make_inputs(batch, seqlen, heads, heads, head_dim, requires_grad=True)
    do = torch.randn_like(q)
    pairs = window_pairs([seqlen] * batch, window)
    full_pairs = window_pairs([seqlen] * batch, None)
    rows = []
    steps = {}  # name -> (forward+backward step, leaves), for the interleaved gate cost

    def record(name, fwd, leaves, out_grad, pairs_counted, note=""):
        row = {"shape": f"B{batch} T{seqlen} H{heads} D{head_dim} w{window}", "implementation": name, "note": note}
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

    record("gatedfwa (gated)", lambda: gated_window_attention(q, k, v, g, window_size=window), [q, k, v, g], do, pairs)
    record("gatedfwa SWA (g=None)", lambda: gated_window_attention(q, k, v, None, window_size=window), [q, k, v], do, pairs)
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

SWEEP = {
    "forward": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                for m, n, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                                   (64, 64, 4, 3), (128, 64, 8, 2)]],
    "dq": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
           for m, n, w, s in [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)]],
    "dkdv": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
             for m, n, w, s in [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3)]],
}


def sweep(shapes):
    """Time each kernel alone under each tile configuration (the others at their defaults)."""
    rows = []
    defaults = dict(launch.CONFIGS)
    for batch, seqlen, heads, head_dim, window in shapes:
        q, k, v, g = make_inputs(batch, seqlen, heads, heads, head_dim)
        do = torch.randn_like(q)
        pairs = window_pairs([seqlen] * batch, window)
        for kernel, configs in SWEEP.items():
            for config in configs:
                if head_dim > 128 and config["BLOCK_M"] * config["BLOCK_N"] > 64 * 64:
                    continue
                launch.CONFIGS.update(defaults)
                launch.CONFIGS[kernel] = lambda d, has_gate=True, c=config: dict(c)
                row = {"shape": f"B{batch} T{seqlen} H{heads} D{head_dim} w{window}", "kernel": kernel, **config}
                try:
                    # The gate chunk follows the smallest tile side in use.
                    sums = chunk_gate_sums(g, launch.gate_chunk(head_dim))
                    o, lse2 = attention_forward(q, k, v, sums, window, head_dim**-0.5, None)
                    if kernel == "forward":
                        fn = lambda: attention_forward(q, k, v, sums, window, head_dim**-0.5, None)  # noqa: E731
                        flops_factor = 1.0
                    else:
                        fn = lambda: attention_backward(do, q, k, v, sums, o, lse2, window, head_dim**-0.5, None)  # noqa: E731
                        flops_factor = 2.5
                    fn()
                    ms = bench_ms(fn)
                    row["ms"] = ms
                    row["TFLOP/s (this kernel's share)"] = 4 * heads * pairs * head_dim * flops_factor / ms / 1e9
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                rows.append(row)
                print(row, flush=True)
    launch.CONFIGS.update(defaults)
    return rows


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
    args = parser.parse_args(argv)
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
        rows = sweep([(4, 8192, 16, 128, 2048), (4, 8192, 16, 128, 512), (4, 8192, 16, 64, 512)])
        write_results(args.out, "attention_sweep", {"environment": env, "rows": rows}, rows,
                      ["shape", "kernel", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "ms",
                       "TFLOP/s (this kernel's share)", "error"])


if __name__ == "__main__":
    main()
