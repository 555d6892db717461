"""Context-parallel window attention on 2 and 4 CPU processes (gloo) against one process on
the whole sequence: outputs and every gradient (q, k, v, g) under the rule of
docs/correctness.md (error against the float64 naive reference <= 2x the naive path's own
error in the same precision + slack).

Each spawned run checks many cases (spawning costs seconds, a case milliseconds). Every rank
draws the whole sequence from one seed, runs the reference on it, and compares its own rows.
Shard lengths (7, 13) are multiples of no tile size.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gatedfwa import gated_window_attention
from gatedfwa.distributed import context_parallel as context_parallel_module
from gatedfwa.distributed import context_parallel_gated_window_attention
from gatedfwa.distributed import halo as halo_module
from gatedfwa.distributed.halo import HaloPlan
from gatedfwa.ops.window_attention.reference import naive_gated_window_attention
from gatedfwa.testing import assert_within_rule, float32_slack
from tests.distributed.launch import run_on_ranks

# name, batch, shard length, query heads, kv heads, head_dim, window, gated, dtype, backend
CASES = [
    ("w<shard gated", 2, 13, 4, 2, 16, 5, True, torch.float32, None),
    ("w<shard ungated", 2, 13, 4, 2, 16, 5, False, torch.float32, None),
    ("w=shard+1 gated B=1", 1, 13, 2, 2, 8, 14, True, torch.float32, None),
    ("w>shard gated (several owners)", 2, 7, 4, 1, 16, 17, True, torch.float32, None),
    ("w>shard ungated", 1, 7, 2, 2, 16, 17, False, torch.float32, None),
    ("w>sequence gated", 1, 7, 2, 1, 8, 100, True, torch.float32, None),
    ("w=1 gated", 2, 7, 2, 2, 8, 1, True, torch.float32, None),
    ("w<shard gated bf16", 1, 13, 4, 2, 16, 6, True, torch.bfloat16, None),
]
if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels on CPU tensors (tests/conftest.py)
    CASES.append(("w>shard gated triton", 1, 7, 2, 1, 16, 10, True, torch.float32, "triton"))


def _inputs(batch, seqlen, q_heads, kv_heads, head_dim, gated, dtype, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    q, k, v = randn(batch, seqlen, q_heads, head_dim), randn(batch, seqlen, kv_heads, head_dim), randn(
        batch, seqlen, kv_heads, head_dim)
    # Gates from little decay to a few units per step, so the boundary's gate sums matter.
    g = F.logsigmoid(randn(batch, seqlen, q_heads) * 2 + 1) if gated else None
    do = randn(batch, seqlen, q_heads, head_dim)
    return [x.to(dtype) for x in (q, k, v)], g, do.to(dtype)


def _with_grads(fn, tensors, do):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in tensors]
    o = fn(*leaves)
    present = [x for x in leaves if x is not None]
    return o.detach(), torch.autograd.grad(o, present, do)


def _check_case(rank, world, case, seed, group=None) -> list[str]:
    """rank and world: this process's place in `group` (default: the world)."""
    name, batch, shard, q_heads, kv_heads, head_dim, window, gated, dtype, backend = case
    previous = os.environ.get("GATEDFWA_BACKEND")
    if backend:
        os.environ["GATEDFWA_BACKEND"] = backend
    try:
        generator = torch.Generator().manual_seed(seed)
        (q, k, v), g, do = _inputs(batch, shard * world, q_heads, kv_heads, head_dim, gated, dtype, generator)
        rows = slice(rank * shard, (rank + 1) * shard)

        def naive(q, k, v, g):
            return naive_gated_window_attention(q, k, v, g, window_size=window)[0]

        ref = _with_grads(naive, [q.double(), k.double(), v.double(), None if g is None else g.double()], do.double())
        low = _with_grads(naive, [q, k, v, g], do)
        single = _with_grads(lambda *x: gated_window_attention(*x, window_size=window), [q, k, v, g], do)

        def parallel(q, k, v, g):
            return context_parallel_gated_window_attention(q, k, v, g, window_size=window, group=group)

        local = [None if x is None else x[:, rows] for x in (q, k, v, g)]
        # Count the query rows the op computes: the shard's, no padded halo rows. And record
        # the backward's order: the halo's gradient exchange is posted before the interior
        # queries' backward (the op's first call when there are two) and awaited after it.
        query_rows, events, op = [], [], context_parallel_module.gated_window_attention
        post, add_to = halo_module.TailGradients.post, halo_module.TailGradients.add_to

        def counting_op(q, *args, **kwargs):
            query_rows.append(q.shape[1])
            if len(query_rows) == 1 and q.shape[1] < shard and q.requires_grad:
                q.register_hook(lambda grad: events.append("interior backward"))
            return op(q, *args, **kwargs)

        def logged(method, event):
            def run(self, *args):
                events.append(event)
                return method(self, *args)
            return run

        context_parallel_module.gated_window_attention = counting_op
        halo_module.TailGradients.post = logged(post, "exchange posted")
        halo_module.TailGradients.add_to = logged(add_to, "exchange awaited")
        try:
            fast = _with_grads(parallel, local, do[:, rows])
        finally:
            context_parallel_module.gated_window_attention = op
            halo_module.TailGradients.post, halo_module.TailGradients.add_to = post, add_to
    finally:
        if previous is None:
            os.environ.pop("GATEDFWA_BACKEND", None)
        else:
            os.environ["GATEDFWA_BACKEND"] = previous

    failures = []
    if sum(query_rows) != shard:
        failures.append(f"{name}: the op computed {query_rows} query rows for a shard of {shard}")
    if window > 1 and "interior backward" in events and events != ["exchange posted", "interior backward", "exchange awaited"]:
        failures.append(f"{name}: backward order {events}")
    if world > 1 and window - 1 < shard and window > 1 and "interior backward" not in events:
        failures.append(f"{name}: no interior queries computed apart from the halo's")
    names = ["o", "dq", "dk", "dv", "dg"]
    for i, label in enumerate(names[: 4 + gated]):
        pick = (lambda r: r[0]) if i == 0 else (lambda r, i=i: r[1][i - 1])
        reference = pick(ref)[:, rows]
        try:
            # The context-parallel result and the single-process op both within the rule.
            for what, result in (("context-parallel", pick(fast)), ("single-process", pick(single)[:, rows])):
                assert_within_rule(f"{name} {what} {label}", result, pick(low)[:, rows], reference,
                                   atol=float32_slack(reference, dtype))
        except AssertionError as error:
            failures.append(str(error))
    return failures


def _check_all_cases(rank, world, seed) -> list[str]:
    failures = []
    for i, case in enumerate(CASES):
        failures += _check_case(rank, world, case, seed + i)
    if world == 4:
        # Two context-parallel groups side by side (as in a 2-D mesh with data parallelism),
        # each splitting its own sequence over 2 ranks.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for case in CASES[:4]:
            failures += [f"group {rank // 2}: {f}" for f in
                         _check_case(rank % 2, 2, case, seed + 100 + rank // 2, group=pairs[rank // 2])]
    return failures


def _check_cases_and_bad_input(rank, world, seed) -> list[str]:
    """Both checks in one spawned run (starting the processes costs most of the time);
    failures are tagged 'cases:' or 'bad input:'."""
    return ([f"cases: {f}" for f in _check_all_cases(rank, world, seed)]
            + [f"bad input: {f}" for f in _check_bad_input(rank, world)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> the failures of one spawned run of every check on that many processes."""
    results = {}

    def run(world):
        if world not in results:
            seed = zlib.crc32(f"context-parallel {world}".encode()) + torch.randint(0, 2**20, ()).item()
            results[world] = run_on_ranks(world, _check_cases_and_bad_input, seed,
                                          tmp_path=tmp_path_factory.mktemp(f"world{world}"))
        return results[world]

    return run


@pytest.mark.parametrize("world", [2, 4])
def test_matches_one_process(world, runs):
    failures = [f for f in runs(world) if ": cases: " in f]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def _expect(error_type, fragment, fn) -> list[str]:
    try:
        fn()
    except error_type as error:
        return [] if fragment in str(error) else [f"{error_type.__name__} without {fragment!r}: {error}"]
    return [f"no {error_type.__name__} ({fragment!r})"]


def _check_bad_input(rank, world) -> list[str]:
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    g = F.logsigmoid(torch.randn(1, 5, 2))
    cp = context_parallel_gated_window_attention
    failures = []
    failures += _expect(ValueError, "window_size", lambda: cp(q, k, v, g, window_size=None))
    failures += _expect(ValueError, "window_size", lambda: cp(q, k, v, g, window_size=0))
    failures += _expect(ValueError, "g must have shape", lambda: cp(q, k, v, g[:, :4], window_size=3))
    failures += _expect(ValueError, "g must hold finite log gates", lambda: cp(q, k, v, -g, window_size=3))
    failures += _expect(ValueError, "shard of length >= 1", lambda: cp(q[:, :0], k[:, :0], v[:, :0], window_size=3))
    # A different shard length on one rank: every rank learns it from the all_gather and raises.
    n = 5 + rank
    failures += _expect(ValueError, "shard length", lambda: cp(
        torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8), window_size=3))
    failures += _expect(ValueError, "window_size", lambda: cp(q, k, v, window_size=3 + rank))
    # The group is still usable after the refusals.
    o = cp(q, k, v, g, window_size=3)
    dist.barrier()
    if o.shape != q.shape:
        failures.append(f"after the errors, output shape {tuple(o.shape)}")
    return failures


@pytest.mark.parametrize("world", [2, 4])
def test_bad_input_raises(world, runs):
    failures = [f for f in runs(world) if ": bad input: " in f]
    assert not failures, "\n".join(failures)


def test_needs_process_group():
    x = torch.randn(1, 4, 2, 8)
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_gated_window_attention(x, x, x, window_size=3)


# --------------------------------------------------------------------------------------
# The exchange plan against brute force
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,shard,window", [(2, 5, 3), (4, 3, 8), (4, 3, 100), (3, 4, 1), (5, 2, 4), (1, 6, 9)])
def test_halo_plan(world, shard, window):
    plans = [HaloPlan.build(r, world, shard, window - 1) for r in range(world)]
    for r, plan in enumerate(plans):
        start = max(0, r * shard - (window - 1))
        assert plan.halo == r * shard - start
        # The halo, piece by piece, is exactly the global positions [start, r * shard), each
        # piece from the rank that owns it, and the owner sends the same positions.
        covered = []
        for piece in plan.receives:
            positions = range(start + piece.start, start + piece.end)
            assert all(p // shard == piece.peer for p in positions)
            covered += positions
            owner = plans[piece.peer]
            sent = [s for s in owner.sends if s.peer == r]
            assert len(sent) == 1
            assert range(piece.peer * shard + sent[0].start, piece.peer * shard + sent[0].end) == positions
        assert covered == list(range(start, r * shard))
        # Every send is received, and the tail covers every send.
        for s in plan.sends:
            assert any(p.peer == r for p in plans[s.peer].receives)
            assert s.start >= shard - plan.tail
