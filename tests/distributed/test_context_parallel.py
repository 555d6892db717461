"""Context-parallel window attention on 2 and 4 CPU processes (gloo) against one process on
the whole sequence: outputs and every gradient (q, k, v, g) under the rule of
docs/correctness.md (error against the float64 naive reference <= 2x the naive path's own
error in the same precision + slack).

Each spawned run checks many cases (spawning costs seconds, a case milliseconds). Every rank
draws the whole sequence from one seed, runs the reference on it, and compares its own rows.
Shard lengths (7, 13, 24) are multiples of no tile size. The cases named "fused" take the
Triton backend's path (gatedfwa/distributed/fused.py, the kernels interpreted), the others
the composition through the public op.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gatedfwa import gated_window_attention
from gatedfwa.distributed import context_parallel as context_parallel_module
from gatedfwa.distributed import context_parallel_gated_window_attention
from gatedfwa.distributed import fused as fused_module
from gatedfwa.distributed import halo as halo_module
from gatedfwa.distributed.halo import HaloPlan
from gatedfwa.ops.window_attention import launch
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention
from gatedfwa.testing import assert_within_rule, float32_slack
from tests.distributed.launch import run_on_ranks


# name, batch, shard length, query heads, kv heads, head_dim, window, gated, dtype, backend
# (None: the default on CPU tensors, the composition through the public op; "triton": the
# fused path of gatedfwa/distributed/fused.py, the kernels interpreted on CPU).
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
    CASES += [
        ("fused w<shard gated", 1, 24, 2, 1, 16, 9, True, torch.float32, "triton"),
        ("fused w<shard ungated B=2", 2, 24, 2, 2, 16, 9, False, torch.float32, "triton"),
        ("fused w>shard gated", 1, 7, 2, 1, 16, 10, True, torch.float32, "triton"),
        ("fused w>shard ungated B=2", 2, 7, 2, 2, 16, 17, False, torch.float32, "triton"),
    ]


def _inputs(batch, seqlen, q_heads, kv_heads, head_dim, gated, dtype, generator, gate_center=1.0):
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    q, k, v = randn(batch, seqlen, q_heads, head_dim), randn(batch, seqlen, kv_heads, head_dim), randn(
        batch, seqlen, kv_heads, head_dim)
    # Gates from little decay to a few units per step, so the boundary's gate sums matter
    # (a larger gate_center: little decay anywhere).
    g = F.logsigmoid(randn(batch, seqlen, q_heads) * 2 + gate_center) if gated else None
    do = randn(batch, seqlen, q_heads, head_dim)
    return [x.to(dtype) for x in (q, k, v)], g, do.to(dtype)


def _with_grads(fn, tensors, do):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in tensors]
    o = fn(*leaves)
    present = [x for x in leaves if x is not None]
    return o.detach(), torch.autograd.grad(o, present, do)


@contextlib.contextmanager
def _patched(*replacements):
    """(object, attribute name, replacement) set for the duration, then restored."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, value in replacements:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def _recording(shard, query_rows: list, events: list, poison: bool):
    """Record the query rows each attention call computes and the backward's order of events,
    on both paths: the public op's calls (the composition) and the kernels' entry points (the
    fused path). With `poison`, the kernels' output buffers start as NaN."""
    op = context_parallel_module.gated_window_attention
    forward, backward = fused_module._forward_impl, fused_module._backward_impl
    post, add_to = halo_module.TailGradients.post, halo_module.TailGradients.add_to

    def counting_op(q, *args, **kwargs):
        query_rows.append(q.shape[1])
        if len(query_rows) == 1 and q.shape[1] < shard and q.requires_grad:
            q.register_hook(lambda grad: events.append("interior backward"))
        return op(q, *args, **kwargs)

    def counting_forward(q, *args):
        query_rows.append(q.shape[1])
        return forward(q, *args)

    def logged_backward(do, q, k, *args):
        events.append("shard backward" if q.shape[1] == k.shape[1] == shard else "first rows backward")
        return backward(do, q, k, *args)

    def logged(method, event):
        def run(self, *args):
            events.append(event)
            return method(self, *args)
        return run

    replacements = [
        (context_parallel_module, "gated_window_attention", counting_op),
        (fused_module, "_forward_impl", counting_forward),
        (fused_module, "_backward_impl", logged_backward),
        (halo_module.TailGradients, "post", logged(post, "exchange posted")),
        (halo_module.TailGradients, "add_to", logged(add_to, "exchange awaited")),
    ]
    if poison:
        replacements.append((launch, "allocate_like", lambda x: torch.full_like(x, float("nan"))))
    with _patched(*replacements):
        yield


def _fused_plan_failures(name, rank, world, shard, window, query_rows, events) -> list[str]:
    """The fused path's calls: the whole shard (unless every query needs the halo), and on a
    rank with a halo the first min(w - 1, n) queries again; in the backward those first rows,
    then the exchange posted, the whole shard's backward, and the wait last."""
    edge = min(window - 1, shard)
    first, whole = rank > 0, rank == 0 or edge < shard
    rows = ([shard] if whole else []) + ([edge] if first else [])
    order = (["first rows backward"] if first else []) + ["exchange posted"]
    order += (["shard backward"] if whole else []) + ["exchange awaited"]
    failures = []
    if query_rows != rows:
        failures.append(f"{name}: the kernels computed {query_rows} query rows, expected {rows}")
    if events != order:
        failures.append(f"{name}: backward order {events}, expected {order}")
    return failures


def _composed_plan_failures(name, world, shard, window, query_rows, events) -> list[str]:
    """The composition's calls: the shard's rows once, split into the interior (computed
    first) and the first rows; the interior's backward between the exchange's post and wait."""
    failures = []
    if sum(query_rows) != shard:
        failures.append(f"{name}: the op computed {query_rows} query rows for a shard of {shard}")
    if window > 1 and "interior backward" in events and events != ["exchange posted", "interior backward", "exchange awaited"]:
        failures.append(f"{name}: backward order {events}")
    if world > 1 and window - 1 < shard and window > 1 and "interior backward" not in events:
        failures.append(f"{name}: no interior queries computed apart from the halo's")
    return failures


def _check_case(rank, world, case, seed, group=None, gate_center=1.0, offsets=None, compiled=False) -> list[str]:
    """rank and world: this process's place in `group` (default: the world). offsets: packed
    sequences, the whole sequence's cu_seqlens as a list (batch 1). compiled: the op under
    torch.compile(fullgraph=True)."""
    name, batch, shard, q_heads, kv_heads, head_dim, window, gated, dtype, backend = case
    previous = os.environ.get("GATEDFWA_BACKEND")
    if backend:
        os.environ["GATEDFWA_BACKEND"] = backend
    try:
        generator = torch.Generator().manual_seed(seed)
        (q, k, v), g, do = _inputs(batch, shard * world, q_heads, kv_heads, head_dim, gated, dtype, generator,
                                   gate_center)
        rows = slice(rank * shard, (rank + 1) * shard)
        cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)

        def naive(q, k, v, g):
            return naive_gated_window_attention(q, k, v, g, window_size=window, cu_seqlens=cu)[0]

        ref = _with_grads(naive, [q.double(), k.double(), v.double(), None if g is None else g.double()], do.double())
        low = _with_grads(naive, [q, k, v, g], do)
        single = _with_grads(lambda *x: gated_window_attention(*x, window_size=window, cu_seqlens=cu), [q, k, v, g], do)

        def parallel(q, k, v, g):
            return context_parallel_gated_window_attention(q, k, v, g, window_size=window, group=group, cu_seqlens=cu)

        local = [None if x is None else x[:, rows] for x in (q, k, v, g)]
        query_rows, events = [], []
        if compiled:
            fast = _with_grads(torch.compile(parallel, fullgraph=True, backend="aot_eager"), local, do[:, rows])
        else:
            with _recording(shard, query_rows, events, poison=backend == "triton"):
                fast = _with_grads(parallel, local, do[:, rows])
    finally:
        if previous is None:
            os.environ.pop("GATEDFWA_BACKEND", None)
        else:
            os.environ["GATEDFWA_BACKEND"] = previous

    if compiled:
        failures = []  # the calls run inside custom ops and traced code: not recorded
    elif backend == "triton" and world > 1 and window > 1:
        failures = _fused_plan_failures(name, rank, world, shard, window, query_rows, events)
    else:
        failures = _composed_plan_failures(name, world, shard, window, query_rows, events)
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


# Packed sequences (batch 1): name, shard, query heads, kv heads, head_dim, window, gated, backend,
# and the sequences' starts as a function of (world, shard). Sequences cross shard boundaries
# (starting 2 positions before one), start exactly at one, are shorter than the halo (3 and 1
# positions), or empty (a repeated offset); with a window longer than a shard one sequence
# spans several shards and the next starts inside a rank's halo.
def _crossing(world, shard):
    starts = {start for r in range(1, world) for start in (r * shard - 2, r * shard, r * shard + 3, r * shard + 4)}
    return [0, *sorted(starts), world * shard - 1, world * shard - 1, world * shard]


def _spanning(world, shard):
    return [0, shard + 3, world * shard]


PACKED_CASES = [
    ("packed w<shard gated", 13, 4, 2, 16, 6, True, None, _crossing),
    ("packed w>shard gated", 7, 2, 1, 16, 17, True, None, _spanning),
    ("packed w<shard ungated", 13, 2, 2, 8, 5, False, None, _crossing),
]
if os.environ.get("TRITON_INTERPRET") == "1":
    PACKED_CASES += [
        ("fused packed w<shard gated", 12, 2, 1, 16, 7, True, "triton", _crossing),
        ("fused packed w>shard gated", 7, 2, 1, 16, 10, True, "triton", _spanning),
    ]


def _packed(case, world) -> tuple[tuple, list[int]]:
    """(a case of CASES' form, the whole sequence's offsets)."""
    name, shard, q_heads, kv_heads, head_dim, window, gated, backend, starts = case
    return (name, 1, shard, q_heads, kv_heads, head_dim, window, gated, torch.float32, backend), starts(world, shard)


def _check_packed(rank, world, seed) -> list[str]:
    failures = []
    for i, case in enumerate(PACKED_CASES):
        plain, offsets = _packed(case, world)
        failures += _check_case(rank, world, plain, seed + i, offsets=offsets)
    return failures


# Under torch.compile(fullgraph=True): the composition traced around the halo's custom op
# (PyTorch path), and the fused path as one custom op (Triton), packed sequences included.
COMPILED_CASES = [
    ("compiled w<shard gated", 1, 13, 4, 2, 16, 6, True, torch.float32, None),
    ("compiled w>shard gated", 2, 7, 2, 1, 16, 17, True, torch.float32, None),
]
COMPILED_PACKED_CASES = []
if os.environ.get("TRITON_INTERPRET") == "1":
    COMPILED_CASES += [("compiled fused w<shard gated B=2", 2, 12, 2, 1, 16, 7, True, torch.float32, "triton")]
    COMPILED_PACKED_CASES += [("compiled fused packed w<shard", 12, 2, 1, 16, 7, True, "triton", _crossing)]


def _check_compiled(rank, world, seed) -> list[str]:
    failures = []
    for i, case in enumerate(COMPILED_CASES):
        failures += _check_case(rank, world, case, seed + i, compiled=True)
    for i, case in enumerate(COMPILED_PACKED_CASES):
        plain, offsets = _packed(case, world)
        failures += _check_case(rank, world, plain, seed + 50 + i, offsets=offsets, compiled=True)
    return failures


# On 4 ranks, the cases that 2 ranks cannot show: middle ranks that both send and receive
# (w < shard), a halo gathered from several owners (w > shard, w > sequence), on both paths.
# Every case runs on 2 ranks.
FOUR_RANK_CASES = ("w<shard gated", "w>shard gated (several owners)", "w>sequence gated", "fused w<shard gated",
                   "fused w>shard gated")


def _check_all_cases(rank, world, seed) -> list[str]:
    failures = []
    for i, case in enumerate(CASES):
        if world == 2 or case[0] in FOUR_RANK_CASES:
            failures += _check_case(rank, world, case, seed + i)
    if world == 4:
        # Two context-parallel groups side by side (as in a 2-D mesh with data parallelism),
        # each splitting its own sequence over 2 ranks.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        in_pairs = [case for case in CASES if case[0] in ("w<shard gated", "fused w<shard gated")]
        for case in in_pairs:
            failures += [f"group {rank // 2}: {f}" for f in
                         _check_case(rank % 2, 2, case, seed + 100 + rank // 2, group=pairs[rank // 2])]
    return failures


# Rows [0, e) of a rank with a halo, computed without it by the fused path's whole-shard call,
# must leave no trace in the backward (fused._ignore_rows sets their lse to +inf). Gates of
# almost no decay make those rows weigh the halo's keys as much as their own, so their
# without-halo softmax is far from the true one, and a backward that kept them would add
# wrong terms to dk, dv and dg.
STALE_ROWS_CASE = ("stale rows", 1, 24, 2, 1, 16, 9, True, torch.float32, "triton")
STALE_ROWS_GATE_CENTER = 8.0  # logsigmoid(2 N(0, 1) + 8): about -3e-4 per step


def _check_stale_rows(rank, world, seed) -> list[str]:
    """The case passes; the same case with the first rows' lse left as the whole-shard call
    computed it fails on every rank with a halo (the check can see stale rows); and the
    first rows' outputs with and without the halo differ by far more than the rule's bounds."""
    name, batch, shard, q_heads, kv_heads, head_dim, window, gated, dtype, _ = STALE_ROWS_CASE
    edge = min(window - 1, shard)
    failures = _check_case(rank, world, STALE_ROWS_CASE, seed, gate_center=STALE_ROWS_GATE_CENTER)
    with _patched((fused_module, "_ignore_rows", lambda lse2, rows: None)):
        broken = _check_case(rank, world, STALE_ROWS_CASE, seed, gate_center=STALE_ROWS_GATE_CENTER)
    gradients_broken = [f for f in broken if any(f" {label}:" in f for label in ("dk", "dv", "dg"))]
    if rank > 0 and not gradients_broken:
        failures.append("with the first rows' lse left as computed without the halo, dk, dv and dg still "
                        f"passed the rule: the check cannot see stale rows ({broken})")
    if rank > 0:
        generator = torch.Generator().manual_seed(seed)
        (q, k, v), g, _ = _inputs(batch, shard * world, q_heads, kv_heads, head_dim, gated, dtype, generator,
                                  STALE_ROWS_GATE_CENTER)
        first = slice(rank * shard, rank * shard + edge)
        shard_rows = slice(rank * shard, (rank + 1) * shard)
        with_halo = naive_gated_window_attention(q, k, v, g, window_size=window)[0][:, first]
        without = naive_gated_window_attention(*(x[:, shard_rows] for x in (q, k, v, g)), window_size=window)[0]
        difference = (with_halo - without[:, :edge]).abs().max().item()
        if not difference > 0.1:
            failures.append(f"the first rows with and without the halo differ by only {difference:.3g}")
    return failures


# bfloat16 through the composition (the PyTorch path, which computes in float32): it runs in
# float32 and rounds once, so its result is the one-process result up to the order of float32
# sums, which flips the bfloat16 rounding of a few elements at most: the output, and the
# gradients of the keys near a shard boundary (the sum of parts from two calls and from a
# later rank). Rounded part by part, as before, those differ on about a third of their
# elements.
ROUNDING_CASE = ("bf16 rounding", 1, 24, 2, 2, 16, 11, True, torch.bfloat16, None)
ROUNDED_ONCE_MAX_SHARE = 0.02
ROUNDED_PER_PART_MIN_SHARE = 0.10


def _differing_shares(rank, world, seed) -> dict[str, float]:
    """For o, dk and dv: the share of this shard's elements that differ from the
    one-process op's, bit for bit."""
    name, batch, shard, q_heads, kv_heads, head_dim, window, gated, dtype, _ = ROUNDING_CASE
    generator = torch.Generator().manual_seed(seed)
    (q, k, v), g, do = _inputs(batch, shard * world, q_heads, kv_heads, head_dim, gated, dtype, generator)
    rows = slice(rank * shard, (rank + 1) * shard)
    one = _with_grads(lambda *x: gated_window_attention(*x, window_size=window), [q, k, v, g], do)
    parallel = _with_grads(lambda *x: context_parallel_gated_window_attention(*x, window_size=window),
                           [x[:, rows] for x in (q, k, v, g)], do[:, rows])
    shares = {"o": (parallel[0] != one[0][:, rows]).float().mean().item()}
    for label, i in (("dk", 1), ("dv", 2)):
        shares[label] = (parallel[1][i] != one[1][i][:, rows]).float().mean().item()
    return shares


def _check_rounding(rank, world, seed) -> list[str]:
    failures = []
    once = _differing_shares(rank, world, seed)
    failures += [f"{label}: {share:.1%} of the elements differ from one process's (at most "
                 f"{ROUNDED_ONCE_MAX_SHARE:.0%} expected)" for label, share in once.items()
                 if share > ROUNDED_ONCE_MAX_SHARE]
    with _patched((context_parallel_module, "composition_dtype", lambda q, backend: q.dtype)):
        per_part = _differing_shares(rank, world, seed)
    if min(per_part["dk"], per_part["dv"]) < ROUNDED_PER_PART_MIN_SHARE:
        failures.append(f"rounded part by part, only {per_part} of the elements differ: the check cannot see "
                        "the rounding it guards")
    return failures


def _check_cases_and_bad_input(rank, world, seed) -> list[str]:
    """Every check in one spawned run (starting the processes costs most of the time);
    failures are tagged 'cases:', 'stale rows:', 'rounding:', 'packed:', 'compiled:' or 'bad input:'."""
    failures = [f"cases: {f}" for f in _check_all_cases(rank, world, seed)]
    if os.environ.get("TRITON_INTERPRET") == "1":
        failures += [f"stale rows: {f}" for f in _check_stale_rows(rank, world, seed + 1000)]
    failures += [f"rounding: {f}" for f in _check_rounding(rank, world, seed + 2000)]
    failures += [f"packed: {f}" for f in _check_packed(rank, world, seed + 3000)]
    if world == 2:
        failures += [f"compiled: {f}" for f in _check_compiled(rank, world, seed + 4000)]
    return failures + [f"bad input: {f}" for f in _check_bad_input(rank, world)]


# world size -> the failures of its spawned run, kept for the whole session: pytest-xdist may
# tear a module's fixtures down between two of its tests, and spawning costs minutes.
_RUNS: dict[int, list[str]] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> the failures of one spawned run of every check on that many processes."""
    results = _RUNS

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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the fused path's kernels on CPU need the interpreter")
@pytest.mark.parametrize("world", [2, 4])
def test_fused_backward_leaves_no_stale_rows(world, runs):
    failures = [f for f in runs(world) if ": stale rows: " in f]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
def test_packed_sequences_match_one_process(world, runs):
    failures = [f for f in runs(world) if ": packed: " in f]
    assert not failures, "\n".join(failures)


def test_compiled_matches_one_process(runs):
    failures = [f for f in runs(2) if ": compiled: " in f]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
def test_bfloat16_composition_rounds_like_one_process(world, runs):
    failures = [f for f in runs(world) if ": rounding: " in f]
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
    # Packed sequences: offsets of the whole sequence (R * 5 positions), the same on every rank.
    whole = 5 * world
    failures += _expect(ValueError, "whole sequence's length", lambda: cp(
        q, k, v, g, window_size=3, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)))
    failures += _expect(TypeError, "int32", lambda: cp(q, k, v, g, window_size=3, cu_seqlens=torch.tensor([0.0, whole])))
    failures += _expect(ValueError, "non-decreasing", lambda: cp(
        q, k, v, g, window_size=3, cu_seqlens=torch.tensor([0, 4, 3, whole], dtype=torch.int32)))
    failures += _expect(ValueError, "batch size must be 1", lambda: cp(
        *(torch.cat([x, x]) for x in (q, k, v, g)), window_size=3, cu_seqlens=torch.tensor([0, whole], dtype=torch.int32)))
    failures += _expect(ValueError, "cu_seqlens", lambda: cp(
        q, k, v, g, window_size=3, cu_seqlens=torch.tensor([0, 2 + rank, whole], dtype=torch.int32)))
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
