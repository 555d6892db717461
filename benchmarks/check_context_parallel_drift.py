"""Where context parallelism's bf16 drift comes from: each piece of the context-parallel
window op, and a short training run, against a float32 computation and one process.

    python benchmarks/check_context_parallel_drift.py                 # CPU: 4 gloo processes (< 1 min)
    torchrun --standalone --nproc-per-node 2 benchmarks/check_context_parallel_drift.py   # GPUs: NCCL

(Run without torchrun, the script starts itself under torchrun with --processes CPU
processes.) Writes context_parallel_drift.json / .md to --out (default benchmarks/results).

**Op pieces.** One sequence of R * n tokens, q, k, v, do in bfloat16 and the log gates in
float32, is run three ways: the float32 computation (the one-process op on float32 copies of
the same values: the reference), the one-process op in bfloat16, and the context-parallel op
in bfloat16 on R ranks. The relative error of each result is taken on each region of the
shards where context parallelism does something one process does not:

* ``first rows``: the first min(w - 1, n) rows of a rank with a halo: the forward reads the
  halo that the exchange brought (o, dq), and their keys' gradients (dk, dv, dg) add the first
  rows' part to the rest;
* ``tail rows``: the last min(w - 1, n) rows of a rank that later ranks read: their keys'
  gradients add the parts those ranks send back (the deferred sum);
* ``other rows``: neither, computed as on one process.

and on the messages themselves: the halo the forward exchange delivers (compared bit for bit
with the owner's rows) and the halo gradients each rank sends back (against the same pieces
from the context-parallel op run in float32).

Both paths of the op are measured: the composition (the PyTorch backend) and the fused
Triton path (on the CPU its kernels run in Triton's interpreter, so its cases are tiny), each
as committed and with the rounding the code had before (``before``: the composition in the
inputs' dtype, so every gradient part is rounded before the parts are summed, and every part
added to a gradient in place one at a time, each add rounded).

**Training.** A small model, bf16 autocast, AdamW, a few steps on a fixed synthetic batch
(the same on every rank): one process in float32 (the reference), one process in bf16, data
parallel over the R ranks, context parallel over the R ranks (committed and before). Reported:
each step's loss difference from one bf16 process and from float32, and the first step's
gradient (same weights everywhere) against both.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# On CPU processes the fused path's kernels run in Triton's interpreter, which must be
# switched on before triton is imported. GPUs run them compiled.
_CUDA = torch.cuda.is_available() and "--cpu" not in sys.argv
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)
from common import REPO, environment, write_results  # noqa: E402

from gatedfwa import gated_window_attention  # noqa: E402
from gatedfwa.distributed import context_parallel as context_parallel_module  # noqa: E402
from gatedfwa.distributed import context_parallel_gated_window_attention, shard_sequence  # noqa: E402
from gatedfwa.distributed import halo as halo_module  # noqa: E402
from gatedfwa.ops.backend import use_backend  # noqa: E402

NAME = "context_parallel_drift"
TENSORS = ["o", "dq", "dk", "dv", "dg"]
REGIONS = ["first rows", "tail rows", "other rows"]


# --------------------------------------------------------------------------------------
# The rounding the code had before (for the "before" rows)
# --------------------------------------------------------------------------------------


def _add_parts_one_at_a_time(grads, parts) -> None:
    """Every part added in place in the gradient's dtype, one add (and rounding) at a time."""
    for start, end, pieces in parts:
        for grad, piece in zip(grads, pieces):
            grad[:, start:end] += piece


@contextlib.contextmanager
def rounding(kind: str):
    """"committed": the code as it is; "before": the composition in the inputs' dtype and
    gradient parts added one at a time."""
    if kind == "committed":
        yield
        return
    saved = context_parallel_module.composition_dtype, halo_module.add_parts
    context_parallel_module.composition_dtype = lambda q, backend: q.dtype
    halo_module.add_parts = _add_parts_one_at_a_time
    try:
        yield
    finally:
        context_parallel_module.composition_dtype, halo_module.add_parts = saved


@contextlib.contextmanager
def captured_messages(sent: list, received: list):
    """Record the halo gradients each rank sends back (TailGradients.post) and the halos the
    forward exchange delivers (PendingHalo.wait)."""
    post, wait = halo_module.TailGradients.post, halo_module.PendingHalo.wait

    def recording_post(self, plan, group, halo_grads):
        sent.append([d.detach().clone() for d in halo_grads])
        return post(self, plan, group, halo_grads)

    def recording_wait(self):
        halos = wait(self)
        received.append([h.detach().clone() for h in halos])
        return halos

    halo_module.TailGradients.post, halo_module.PendingHalo.wait = recording_post, recording_wait
    try:
        yield
    finally:
        halo_module.TailGradients.post, halo_module.PendingHalo.wait = post, wait


# --------------------------------------------------------------------------------------
# Op pieces
# --------------------------------------------------------------------------------------


def _sequence(case: dict, world: int, device, seed: int):
    """q, k, v, do [1, R n, ...] in bfloat16 and g [1, R n, HQ] float32, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    batch, length = case["batch"], case["shard"] * world

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q = randn(batch, length, case["q_heads"], case["head_dim"]).bfloat16()
    k = randn(batch, length, case["kv_heads"], case["head_dim"]).bfloat16()
    v = randn(batch, length, case["kv_heads"], case["head_dim"]).bfloat16()
    g = F.logsigmoid(randn(batch, length, case["q_heads"]) + 3)
    do = randn(batch, length, case["q_heads"], case["head_dim"]).bfloat16()
    return q, k, v, g, do


def _run(fn, inputs, do) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o = fn(*leaves)
    return [o.detach(), *torch.autograd.grad(o, leaves, do)]


def _regions(rank: int, world: int, shard: int, window: int) -> dict[str, torch.Tensor]:
    """Boolean row masks [n] of this rank's regions."""
    edge = min(window - 1, shard)
    first = torch.zeros(shard, dtype=torch.bool)
    tail = torch.zeros(shard, dtype=torch.bool)
    if rank > 0:
        first[:edge] = True
    if rank < world - 1 and window > 1:
        tail[shard - edge:] = True
    return {"first rows": first, "tail rows": tail & ~first, "other rows": ~(first | tail)}


def _sums(x, ref, one) -> torch.Tensor:
    """[5] float64: sum (x - ref)^2, sum (one - ref)^2, sum (x - one)^2, sum ref^2, count of
    elements where x and one differ (bit for bit), count of elements."""
    x, ref, one = x.double(), ref.double(), one.double()
    return torch.tensor([((x - ref) ** 2).sum().item(), ((one - ref) ** 2).sum().item(),
                         ((x - one) ** 2).sum().item(), (ref ** 2).sum().item(),
                         (x != one).sum().item(), float(x.numel())], dtype=torch.float64)


def measure_op(rank, world, group, case: dict, path: str, kinds: tuple[str, ...], device, seed: int) -> list[dict]:
    """One case on one path, for each rounding in `kinds`: per tensor and region, the relative
    errors of one process and of the context-parallel op against float32, their relative
    difference and the share of elements that differ; the messages' errors. Every rank
    returns the group's totals."""
    q, k, v, g, do = _sequence(case, world, device, seed)
    shard, window = case["shard"], case["window"]
    rows = slice(rank * shard, (rank + 1) * shard)

    def whole(*x):
        return gated_window_attention(*x, window_size=window)

    def parallel(*x):
        return context_parallel_gated_window_attention(*x, window_size=window, group=group)

    wide = [x.float() for x in (q, k, v, g)]
    with use_backend("triton" if path == "fused" else "torch"):
        reference = _run(whole, wide, do.float())
        one = _run(whole, [q, k, v, g], do)
        sent_wide, received_wide = [], []
        with captured_messages(sent_wide, received_wide):  # float32 rounds alike either way
            _run(parallel, [x[:, rows] for x in wide], do[:, rows].float())
        results = []
        for kind in kinds:
            sent, received = [], []
            with rounding(kind), captured_messages(sent, received):
                low = _run(parallel, [x[:, rows] for x in (q, k, v, g)], do[:, rows])
            results.append(_op_totals(rank, world, group, case, path, kind, (q, k, v, g), reference, one, low,
                                      received, sent, sent_wide, device))
    return results


def _op_totals(rank, world, group, case, path, kind, inputs, reference, one, low, received, sent, sent_wide,
               device) -> dict:
    """The group's totals of measure_op's statistics for one rounding."""
    shard, window = case["shard"], case["window"]
    rows = slice(rank * shard, (rank + 1) * shard)
    regions = _regions(rank, world, shard, window)
    stats = {}
    for name, ref, a, b in zip(TENSORS, reference, one, low):
        for region, mask in regions.items():
            stats[(name, region)] = _sums(b[:, mask], ref[:, rows][:, mask], a[:, rows][:, mask])
    # The forward halo against the owners' rows, bit for bit (k, v, g as sent).
    halo = min(window - 1, rank * shard)
    mismatch = 0.0
    if received and halo:
        for got, want in zip(received[0], inputs[1:]):
            mismatch += (got.to(want.dtype) != want[:, rank * shard - halo:rank * shard]).sum().item()
    # The halo gradients sent back, dk and dv (dg is float32 either way), against float32.
    message = [0.0, 0.0]
    for low_pieces, wide_pieces in zip(sent, sent_wide):
        for a, b in zip(low_pieces[:2], wide_pieces[:2]):
            message[0] += ((a.double() - b.double()) ** 2).sum().item()
            message[1] += (b.double() ** 2).sum().item()
    keys = sorted(stats)
    extra = torch.tensor([[mismatch, *message, 0.0, 0.0, 0.0]], dtype=torch.float64)
    totals = torch.cat([torch.stack([stats[key] for key in keys]), extra]).to(device)
    dist.all_reduce(totals, group=group)
    totals = totals.cpu()
    result = {"path": path, "rounding": kind, **case, "ranks": world, "regions": {}}
    for i, key in enumerate(keys):
        err_cp, err_one, diff, norm, differing, count = totals[i].tolist()
        if count == 0:
            continue
        scale = math.sqrt(norm) or 1.0
        result["regions"].setdefault(key[1], {})[key[0]] = {
            "rel err one": math.sqrt(err_one) / scale, "rel err cp": math.sqrt(err_cp) / scale,
            "rel diff cp-one": math.sqrt(diff) / scale, "share differing from one": differing / count}
    mismatch, squared, reference_squared = totals[-1][:3].tolist()
    result["forward halo elements differing from the owner's"] = int(mismatch)
    result["returned halo dk, dv: rel err vs float32"] = (math.sqrt(squared / reference_squared)
                                                          if reference_squared else None)
    return result


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _model_config(device):
    from gatedfwa.models import GatedFWAConfig

    if device.type == "cuda":
        fields = dict(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64, window_size=256)
    else:
        fields = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, window_size=12)
    return GatedFWAConfig(**fields, attention_kinds="gatedfwa")


def _batch(vocab: int, rows: int, length: int, device, seed: int) -> torch.Tensor:
    """[rows, length] tokens of a random sparse bigram chain: learnable, so the loss moves."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=gen)
    tokens = torch.empty(rows, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (rows,), generator=gen)
    choice = torch.randint(0, 4, (rows, length), generator=gen)
    for t in range(1, length):
        tokens[:, t] = successors[tokens[:, t - 1], choice[:, t]]
    return tokens.to(device)


def _flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])


# arm -> (what it runs, micro-batches per rank): the batch of S sequences is split into
# micro-batches whose gradients are accumulated, as the trainer does. "one bf16" and "dp" sum
# the same partition of the batch (R parts of S / R sequences), "dp, halved micro-batches"
# another (2R parts of S / 2R), "cp" another again (each rank R parts of S / R sequences'
# shards).
ARMS = {
    "one fp32": ("one", "committed", lambda world: world),
    "one bf16": ("one", "committed", lambda world: world),
    "dp": ("dp", "committed", lambda world: 1),
    "dp, halved micro-batches": ("dp", "committed", lambda world: 2),
    "cp": ("cp", "committed", lambda world: world),
    "cp before": ("cp", "before", lambda world: world),
}


def train_arm(rank, world, group, label: str, config, tokens, steps: int, device, seed: int):
    """(per-step losses, first step's flattened gradient) of one arm of ARMS; the gradient and
    loss are the group's means (the single process's for "one")."""
    from gatedfwa.models import GatedFWAForCausalLM, enable_context_parallel

    arm, kind, micro_batches = ARMS[label]
    micro_batches = micro_batches(world)
    torch.manual_seed(seed)
    model = GatedFWAForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    if arm == "cp":
        enable_context_parallel(model, group)
        inputs = shard_sequence(tokens, group)
    elif arm == "dp":
        inputs = tokens.chunk(world)[rank]
    else:
        inputs = tokens
    autocast = contextlib.nullcontext() if label == "one fp32" else torch.autocast(device.type, dtype=torch.bfloat16)
    losses, first_grad = [], None
    with rounding(kind):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for micro in inputs.chunk(micro_batches):
                with autocast:
                    part = model(micro, labels=micro).loss / micro_batches
                part.backward()
                loss += part.detach().float()
            if arm != "one":
                for p in model.parameters():
                    dist.all_reduce(p.grad, group=group)
                    p.grad /= world
                dist.all_reduce(loss, group=group)
                loss /= world
            if first_grad is None:
                first_grad = _flat_grads(model)
            losses.append(loss.item())
            optimizer.step()
    return losses, first_grad


def measure_training(rank, world, group, device, steps: int, seed: int) -> dict:
    """Every arm of ARMS on one synthetic batch; the one-process arms run on rank 0 and are
    broadcast."""
    config = _model_config(device)
    shard, sequences = (32, 2 * world) if device.type == "cpu" else (1024, 8 * world)
    tokens = _batch(config.vocab_size, sequences, shard * world, device, seed)
    runs = {}
    for label in ARMS:
        if ARMS[label][0] == "one":
            if rank == 0:
                losses, grad = train_arm(rank, world, None, label, config, tokens, steps, device, seed)
            else:
                losses, grad = [0.0] * steps, torch.zeros(_parameter_count(config), device=device)
            packed = torch.tensor(losses, dtype=torch.float64, device=device)
            grad = grad.to(device)
            dist.broadcast(packed, 0, group=group)
            dist.broadcast(grad, 0, group=group)
            losses = packed.tolist()
        else:
            losses, grad = train_arm(rank, world, group, label, config, tokens, steps, device, seed)
        runs[label] = {"losses": losses, "first_grad": grad}
    result = {"config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                          "num_attention_heads", "head_dim", "window_size")},
              "shard": shard, "ranks": world, "sequences": sequences, "steps": steps, "arms": {}}
    for label, run in runs.items():
        row = {"micro-batches per rank": ARMS[label][2](world), "losses": run["losses"]}
        for against in ("one bf16", "one fp32"):
            if label == against:
                continue
            other = runs[against]
            diffs = [abs(a - b) / abs(b) for a, b in zip(run["losses"], other["losses"])]
            row[f"per-step rel. loss diff vs {against}"] = diffs
            row[f"max rel. loss diff vs {against}"] = max(diffs)
            row[f"first-step grad rel. diff vs {against}"] = (
                (run["first_grad"] - other["first_grad"]).norm() / other["first_grad"].norm()).item()
        result["arms"][label] = row
    return result


def _parameter_count(config) -> int:
    from gatedfwa.models import GatedFWAForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in GatedFWAForCausalLM(config).parameters())


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def op_cases(device) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(path, case, roundings): tiny on CPU (the fused path interpreted), GPU-sized on GPUs.
    On the fused path "before" differs from "committed" only where a row takes several
    parts (a window longer than a shard, or first and tail rows that overlap, on a rank
    between two others)."""
    both = ("before", "committed")
    if device.type == "cuda":
        big = dict(batch=1, shard=4096, q_heads=8, kv_heads=8, head_dim=64, window=512)
        long = dict(batch=1, shard=1024, q_heads=8, kv_heads=8, head_dim=64, window=1537)
        return [("fused", big, ("committed",)), ("fused", long, both), ("composition", big, both)]
    small = dict(batch=1, shard=48, q_heads=2, kv_heads=2, head_dim=32, window=17)
    long = dict(batch=1, shard=16, q_heads=2, kv_heads=1, head_dim=16, window=25)  # halo from 2 ranks
    return [("composition", small, both), ("composition", long, both), ("fused", long, both)]


def run(rank: int, world: int, args, device) -> dict:
    group = dist.group.WORLD
    ops = []
    if args.only in (None, "ops"):
        for i, (path, case, kinds) in enumerate(op_cases(device)):
            start = time.perf_counter()
            ops += measure_op(rank, world, group, case, path, kinds, device, args.seed + i)
            if rank == 0:
                print(f"op: {path} {case} {kinds}: {time.perf_counter() - start:.1f} s", flush=True)
    training = None
    if args.only in (None, "training"):
        start = time.perf_counter()
        steps = args.steps or (5 if device.type == "cpu" else 20)
        training = measure_training(rank, world, group, device, steps, args.seed)
        if rank == 0:
            print(f"training: {time.perf_counter() - start:.1f} s", flush=True)
    return {"ops": ops, "training": training}


def _op_rows(ops: list[dict]) -> list[dict]:
    rows = []
    for result in ops:
        for region in REGIONS:
            per_tensor = result["regions"].get(region)
            if not per_tensor:
                continue
            row = {"path": result["path"], "rounding": result["rounding"],
                   "R, n, w": f"{result['ranks']}, {result['shard']}, {result['window']}", "region": region}
            for name in TENSORS:
                if name in per_tensor:
                    t = per_tensor[name]
                    row[f"{name} err one / cp"] = f"{t['rel err one']:.2e} / {t['rel err cp']:.2e}"
                    row[f"{name} diff (share)"] = f"{t['rel diff cp-one']:.1e} ({100 * t['share differing from one']:.0f}%)"
            rows.append(row)
    return rows


def _training_lines(training: dict) -> list[str]:
    lines = ["", "## Training (bf16 autocast)", "",
             f"model {training['config']}, {training['sequences']} sequences of {training['ranks']} x "
             f"{training['shard']} tokens, {training['steps']} steps, AdamW lr 3e-3", "",
             "| arm | micro-batches per rank | first-step grad diff vs one bf16 | first-step grad diff vs fp32 "
             "| max rel. loss diff vs one bf16 | max rel. loss diff vs fp32 | final loss |",
             "|---|---|---|---|---|---|---|"]
    for label, row in training["arms"].items():
        def cell(key):
            value = row.get(key)
            return "" if value is None else f"{value:.2e}"
        lines.append(f"| {label} | {row['micro-batches per rank']} | {cell('first-step grad rel. diff vs one bf16')} | "
                     f"{cell('first-step grad rel. diff vs one fp32')} | {cell('max rel. loss diff vs one bf16')} | "
                     f"{cell('max rel. loss diff vs one fp32')} | {row['losses'][-1]:.4f} |")
    return lines


def _write(args, result: dict, device, world: int) -> None:
    payload = {"environment": environment(), "device": str(device), "ranks": world,
               "backend": dist.get_backend(), **result}
    rows = _op_rows(result["ops"])
    columns = ["path", "rounding", "R, n, w", "region"] + [c for name in TENSORS
                                                            for c in (f"{name} err one / cp", f"{name} diff (share)")]
    write_results(args.out, NAME, payload, rows, columns)
    md = Path(args.out) / f"{NAME}.md"
    extra = ["", "Messages: forward halo elements differing from the owner's rows; returned halo dk, dv "
             "against the same pieces in float32:", ""]
    for r in result["ops"]:
        differing = r["forward halo elements differing from the owner's"]
        returned = r["returned halo dk, dv: rel err vs float32"]
        extra.append(f"- {r['path']} {r['rounding']} (R, n, w = {r['ranks']}, {r['shard']}, {r['window']}): "
                     f"forward halo {differing} elements differing; returned halo gradients {returned:.2e}")
    if result["training"]:
        extra += _training_lines(result["training"])
    md.write_text(md.read_text() + "\n".join(extra) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--processes", type=int, default=4,
                        help="CPU processes when started without torchrun (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 5 on CPU, 20 on GPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["ops", "training"], help="measure only the op pieces or the training")
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even where GPUs are present")
    provenance.add_options(parser)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        # Start under torchrun: one code path for CPU (gloo) and GPU (NCCL) processes.
        provenance.settle_or_exit(parser, args)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(args.processes), __file__, *sys.argv[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        sys.exit(subprocess.run(command, env=env).returncode)
    provenance.settle_or_exit(parser, args)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if _CUDA:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    try:
        result = run(rank, world, args, device)
        if rank == 0:
            _write(args, result, device, world)
            print((Path(args.out) / f"{NAME}.md").read_text())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
