"""Gated window attention at full sizes against float64 references, on a GPU: outputs and
every gradient (dq, dk, dv, dg) beside the error of merely rounding the float64 answer to
bf16, and one sequence of T = 2^20 (error of o and dg at the last 1000 positions against the
first 1000).

    python benchmarks/check_attention.py --out benchmarks/results

Writes attention_check.json/.md (GPU name, versions, commit).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from attention_inputs import DEVICE, make_inputs  # noqa: E402
from common import start_gpu_run, write_results  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention  # noqa: E402
from gatedfwa.ops.window_attention.torch_path import chunked_gated_window_attention  # noqa: E402


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    env = start_gpu_run(parser, args)
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


if __name__ == "__main__":
    main()
