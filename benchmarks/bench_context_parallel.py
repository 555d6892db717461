"""Context-parallel gated window attention on 2 GPUs (NCCL): correctness at full size against
one GPU, one 2^20-token sequence forward+backward across the GPUs, weak scaling, and the halo
exchange's share of the step (docs/distributed.md).

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel.py --out benchmarks/results
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel.py --out /tmp/x --only speed
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel.py --out /tmp/x --smoke  # CPU

Writes context_parallel_check.json/.md and context_parallel_speed.json/.md (rank 0).

Timing: every rank runs the same fixed number of calls (an adaptive timer could run a
different count on each rank and leave a collective unmatched); before each call the ranks
meet at a barrier, and a call's time is the slowest rank's. The median over the calls is
reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    # On CPU processes, take the Triton path that GPUs take (the kernels interpreted); the
    # interpreter must be on before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("GATEDFWA_BACKEND", "triton")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

from common import attention_tflops, environment, error_record, kernel_device_ms, window_pairs, write_results  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402
from gatedfwa.distributed import context_parallel_gated_window_attention  # noqa: E402
from gatedfwa.distributed.fused import fused_backward, fused_forward  # noqa: E402
from gatedfwa.distributed.packed import ShardOffsets  # noqa: E402
from gatedfwa.distributed.partial_sums import add_parts  # noqa: E402
from gatedfwa.distributed.halo import HaloLink, HaloPlan, attach_halo, start_halo_exchange  # noqa: E402
from gatedfwa.ops.window_attention.torch_path import chunked_gated_window_attention  # noqa: E402


def make_sequence(seqlen, q_heads, kv_heads, head_dim, gate, device, seed, dtype=torch.bfloat16):
    """One sequence [1, seqlen, ...], the same on every rank (one seed); gates
    logsigmoid(N(0, 1) + 3) as in attention_inputs.py."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q = randn(1, seqlen, q_heads, head_dim).to(dtype)
    k = randn(1, seqlen, kv_heads, head_dim).to(dtype)
    v = randn(1, seqlen, kv_heads, head_dim).to(dtype)
    g = F.logsigmoid(randn(1, seqlen, q_heads) + 3) if gate else None
    do = randn(1, seqlen, q_heads, head_dim).to(dtype)
    return q, k, v, g, do


def leaves(*tensors):
    return [None if x is None else x.detach().clone().requires_grad_() for x in tensors]


def forward_backward(fn, inputs, do):
    """(o, grads of the inputs that are not None)."""
    o = fn(*inputs)
    present = [x for x in inputs if x is not None]
    return o.detach(), torch.autograd.grad(o, present, do)


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------
# Correctness at full size
# --------------------------------------------------------------------------------------

CHECKS = [
    # name, T (whole sequence), HQ, H, D, window, gated
    ("T32k D128 16 heads w2048 gated", 32768, 16, 16, 128, 2048, True),
    ("T32k D128 GQA4 w2048 ungated", 32768, 16, 4, 128, 2048, False),
    ("T4k D128 w3000 > shard, gated", 4096, 8, 8, 128, 3000, True),
    ("T8k D64 w1 gated (no exchange)", 8192, 8, 8, 64, 1, True),
]


def check(name, seqlen, q_heads, kv_heads, head_dim, window, gated, rank, world, device):
    """This rank's rows of o and all gradients: context-parallel, one GPU on the whole
    sequence, and a float64 chunked reference. Passes when the context-parallel error is
    within 2x the one-GPU error (+ 1e-6): splitting the sequence costs no accuracy."""
    q, k, v, g, do = make_sequence(seqlen, q_heads, kv_heads, head_dim, gated, device, seed=seqlen + window)
    shard = seqlen // world
    rows = slice(rank * shard, (rank + 1) * shard)

    def cp(q, k, v, g):
        return context_parallel_gated_window_attention(q, k, v, g, window_size=window)

    local = leaves(*(None if x is None else x[:, rows] for x in (q, k, v, g)))
    parallel = forward_backward(cp, local, do[:, rows])
    single = forward_backward(lambda *x: gated_window_attention(*x, window_size=window), leaves(q, k, v, g), do)
    ref = forward_backward(lambda *x: chunked_gated_window_attention(*x, window_size=window)[0],
                           leaves(*(None if x is None else x.double() for x in (q, k, v, g))), do.double())
    row = {"check": name, "rank": rank}
    ok = True
    labels = ("o", "dq", "dk", "dv", "dg")[: 4 + gated]
    for i, label in enumerate(labels):
        pick = (lambda r: r[0]) if i == 0 else (lambda r, i=i: r[1][i - 1])
        reference = pick(ref)[:, rows]
        cp_err = relative_error(pick(parallel), reference)
        single_err = relative_error(pick(single)[:, rows], reference)
        row[f"{label} cp rel err"], row[f"{label} 1-GPU rel err"] = cp_err, single_err
        ok &= bool(torch.isfinite(pick(parallel)).all()) and cp_err <= 2 * single_err + 1e-6
    row["ok"] = ok
    del parallel, single, ref
    empty_cache()
    return row


def run_checks(rank, world, device):
    rows = []
    for spec in CHECKS:
        try:
            rows.append(check(*spec, rank=rank, world=world, device=device))
        except Exception as exc:  # noqa: BLE001 - record and go on
            rows.append({"check": spec[0], "rank": rank, "ok": False, **error_record(exc)})
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return [row for per_rank in gathered for row in per_rank]


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


class LocalHalo(HaloLink):
    """A link that moves nothing, for the step's compute alone: the halos are zeros held
    locally, and no gradients return."""

    class _Zeros:
        def __init__(self, halos):
            self.halos = halos

        def wait(self):
            return self.halos

    class _NothingReturns:
        def add_to(self, grads, first_position, more=()):
            # The shard's own parts are still added (as the real exchange's add_to does),
            # with nothing received.
            add_parts(grads, list(more))

    def start(self, tensors):
        return self._Zeros([x.new_zeros(x.shape[0], self.plan.halo, *x.shape[2:]) for x in tensors])

    def post_gradients(self, halo_grads):
        return self._NothingReturns()



DEVICE = "cuda"  # "cpu" with --smoke


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def synchronize():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_ms(fn, warmup=3, reps=10):
    """Median over `reps` calls of the slowest rank's milliseconds (fixed counts on all ranks)."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(reps):
        dist.barrier()
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    slowest = torch.tensor(times, device=DEVICE)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def step(fn, inputs, do):
    """A forward+backward closure; gradients land in .grad (cleared each call)."""
    def run():
        for x in inputs:
            if x is not None:
                x.grad = None
        fn(*inputs).backward(do)
    return run


def speed(rank, world, device, seqlen, q_heads, head_dim, window):
    """One sequence of `seqlen` tokens split over the ranks, against one GPU on its shard
    length (weak scaling) and on the whole sequence; the exchange alone and the step's
    compute without any exchange."""
    shard = seqlen // world
    group = dist.group.WORLD
    result = {"T": seqlen, "ranks": world, "shard": shard, "HQ": q_heads, "H": q_heads, "D": head_dim,
              "window": window, "dtype": "bfloat16", "gated": True}
    q, k, v, g, do = make_sequence(shard, q_heads, q_heads, head_dim, True, device, seed=rank)
    shard_inputs = leaves(q, k, v, g)

    def cp(q, k, v, g):
        return context_parallel_gated_window_attention(q, k, v, g, window_size=window)

    def single(q, k, v, g):
        return gated_window_attention(q, k, v, g, window_size=window)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["context-parallel ms"] = cp_ms = time_ms(step(cp, shard_inputs, do))
    if device.type == "cuda":
        result["context-parallel peak GiB per GPU"] = torch.cuda.max_memory_allocated() / 2**30
    result["context-parallel TFLOP/s per GPU"] = attention_tflops(
        window_pairs([seqlen], window), q_heads, head_dim, cp_ms, backward=True) / world
    # Weak scaling: one GPU with one shard (each rank times its own, at once).
    result["1 GPU, T/R ms"] = one_ms = time_ms(step(single, shard_inputs, do))
    result["weak scaling time(R GPUs, R*T) / time(1 GPU, T)"] = cp_ms / one_ms

    # The halo exchange alone, forward and backward, on the same tensors.
    plan = HaloPlan.build(rank, world, shard, window - 1)
    halo_grads = [torch.randn(1, plan.halo, *x.shape[2:], device=device, dtype=x.dtype) for x in (k, v, g)]

    def exchange_only():
        exchanged = shard_inputs[1:]
        halos = attach_halo(start_halo_exchange(plan, group, exchanged), exchanged)
        torch.autograd.backward(halos, halo_grads)

    result["exchange alone ms"] = exchange_ms = time_ms(exchange_only)
    result["exchange alone / step"] = exchange_ms / cp_ms

    # The step's compute without any exchange: the same path on a halo of zeros held locally
    # (on CUDA the fused path of gatedfwa/distributed/fused.py).
    edge = min(window - 1, shard)

    local = LocalHalo(plan, group)
    scale = head_dim ** -0.5
    plain = [None if x is None else x.detach().contiguous() for x in shard_inputs]

    def compute_only():
        # fused.py's forward and backward (what its op runs) on the local halo, without autograd.
        o, *saved = fused_forward(*plain, window, scale, local, ShardOffsets())
        fused_backward(do, *plain, o, saved, window, scale, local, ShardOffsets())

    result["compute without exchange ms"] = compute_ms = time_ms(compute_only)
    result["exposed exchange ms (step - compute)"] = cp_ms - compute_ms
    result["exposed exchange / step"] = (cp_ms - compute_ms) / cp_ms

    # Where the compute goes: the step is the plain call on the whole shard plus, on a rank
    # with a halo, the first `edge` queries again against [halo ‖ first edge keys] (fewer
    # queries than keys). That call alone (every rank times it with the last rank's halo, so
    # that all take part in time_ms's collectives), and on CUDA the device time of every
    # kernel of the plain call, of the first rows' call and of the context-parallel step (the
    # JSON keeps them).
    halo = HaloPlan.build(world - 1, world, shard, window - 1).halo
    first_rows_inputs = leaves(q[:, :edge], *(torch.cat([x.new_zeros(1, halo, *x.shape[2:]), x[:, :edge]], dim=1)
                                              for x in (k, v, g)))
    result["first rows call alone ms"] = time_ms(step(single, first_rows_inputs, do[:, :edge]))
    if device.type == "cuda":
        result["kernels, plain call (ms per call)"] = kernel_device_ms(step(single, shard_inputs, do), iterations=5)
        result["kernels, first rows call (ms per call)"] = kernel_device_ms(
            step(single, first_rows_inputs, do[:, :edge]), iterations=5)
        result["kernels, context-parallel step (ms per call)"] = kernel_device_ms(
            step(cp, shard_inputs, do), iterations=5)
    del first_rows_inputs
    del shard_inputs, q, k, v, g, do
    empty_cache()

    # Strong scaling: the whole sequence on one GPU (each rank times it on its own GPU).
    try:
        whole = make_sequence(seqlen, q_heads, q_heads, head_dim, True, device, seed=7)
        whole_inputs = leaves(*whole[:4])
        result["1 GPU, whole T ms"] = whole_ms = time_ms(step(single, whole_inputs, whole[4]), reps=5)
        result["speedup over 1 GPU, whole T"] = whole_ms / cp_ms
        del whole, whole_inputs
    except torch.OutOfMemoryError as exc:
        result["1 GPU, whole T"] = error_record(exc)
    empty_cache()
    return result


SPEED_SHAPES = [
    # T (whole sequence), HQ, D, window
    (2**20, 16, 128, 2048),
    (2**18, 16, 128, 2048),
]

# --smoke: the whole script on CPU processes (gloo) at tiny sizes, to check that it runs.
SMOKE_CHECKS = [("smoke gated w>shard", 64, 2, 1, 16, 40, True), ("smoke ungated", 96, 2, 2, 16, 9, False)]
SMOKE_SHAPES = [(128, 2, 16, 24)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    parser.add_argument("--only", choices=["check", "speed"], help="run one part only")
    parser.add_argument("--smoke", action="store_true", help="CPU processes (gloo), tiny sizes: does it run")
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    provenance.settle_or_exit(parser, args, strict=not args.smoke)
    global DEVICE, CHECKS, SPEED_SHAPES
    if "LOCAL_RANK" not in os.environ:
        sys.exit("run under torchrun: torchrun --standalone --nproc-per-node 2 " + __file__)
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.smoke:
        DEVICE, CHECKS, SPEED_SHAPES = "cpu", SMOKE_CHECKS, SMOKE_SHAPES
        device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend)
    else:
        if not torch.cuda.is_available():
            sys.exit("needs CUDA GPUs (or --smoke on CPU)")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    env = environment() | {"ranks": world, "backend": backend}
    try:
        if args.only in (None, "check"):
            rows = run_checks(rank, world, device)
            if rank == 0:
                payload = {"environment": env, "checks": rows, "ok": all(r.get("ok") for r in rows)}
                columns = ["check", "rank", "ok"] + [f"{x} {kind}" for x in ("o", "dq", "dk", "dv", "dg")
                                                     for kind in ("cp rel err", "1-GPU rel err")]
                write_results(args.out, "context_parallel_check", payload, rows, columns)
                print(f"checks: {'all ok' if payload['ok'] else 'FAILED'}", flush=True)
        if args.only in (None, "speed"):
            rows = []
            for shape in SPEED_SHAPES:
                try:
                    rows.append(speed(rank, world, device, *shape))
                except Exception as exc:  # noqa: BLE001 - record and go on
                    rows.append({"T": shape[0], **error_record(exc)})
                if rank == 0:
                    print(rows[-1], flush=True)
            if rank == 0:
                columns = ["T", "ranks", "window", "context-parallel ms", "1 GPU, T/R ms",
                           "weak scaling time(R GPUs, R*T) / time(1 GPU, T)", "1 GPU, whole T ms",
                           "speedup over 1 GPU, whole T", "exchange alone ms", "exchange alone / step",
                           "exposed exchange / step", "compute without exchange ms", "first rows call alone ms",
                           "context-parallel peak GiB per GPU",
                           "context-parallel TFLOP/s per GPU"]
                write_results(args.out, "context_parallel_speed", {"environment": env, "speed": rows}, rows, columns)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
