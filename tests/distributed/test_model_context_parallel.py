"""A GatedFWA language model with its sequences split across 2 CPU processes (gloo) against
one process on the whole sequences: the loss and every parameter gradient, averaged over the
context-parallel group, equal the single-process ones (float32, tight tolerance); with packed
sequences (cu_seq_lens_q/k of the whole sequence) and under torch.compile(fullgraph=True) too.

Every rank builds the model from one seed (identical weights), draws the whole batch from one
seed, runs the single-process model on it, then the context-parallel model on its shard. One
spawned run checks every case (spawning costs seconds, a case milliseconds).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

from gatedfwa.distributed import shard_sequence
from gatedfwa.models import GatedFWAForCausalLM, enable_context_parallel
from tests.distributed.launch import run_on_ranks
from tests.distributed.test_context_parallel import _expect
from tests.models.test_model import tiny_config

WORLD = 2
SHARD = 6  # tokens per rank; sequences of WORLD * SHARD

# name, config overrides
CASES = [
    ("gatedfwa w<shard", dict(attention_kinds="gatedfwa", window_size=4)),
    ("gatedfwa w>shard", dict(attention_kinds="gatedfwa", window_size=9)),
    ("swa w<shard", dict(attention_kinds="swa", window_size=4)),
    ("swa w>shard", dict(attention_kinds="swa", window_size=9)),
    ("mixed kinds, token shift, qk norm, output gate",
     dict(attention_kinds=["swa", "gatedfwa"], window_size=5, token_shift=True, qk_norm=True, output_gate=True)),
]

# float32: the two runs add the same terms in a different order (split softmax and gate
# sums, gradients summed from two ranks).
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, input_ids, labels, step=None):
    """step: what computes the loss (default the model; its compiled form)."""
    model.zero_grad(set_to_none=True)
    loss = (model if step is None else step)(input_ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# Packed sequences (batch 1): the whole sequence's offsets; one sequence crosses the shard
# boundary (starting 2 before it), the next starts inside the halo of the second shard.
PACKED_OFFSETS = [0, 3, SHARD - 2, SHARD + 2, WORLD * SHARD]
PACKED_CASES = [
    ("packed gatedfwa w<shard, token shift", dict(attention_kinds="gatedfwa", window_size=5, token_shift=True)),
    ("packed swa w>shard", dict(attention_kinds="swa", window_size=9)),
]
# A compiled model step (torch.compile(fullgraph=True) of the forward; the backward compiled
# with it), against one process in eager mode: every message of a step (the attention's halo,
# the token shift's, the loss's label and count) in the graph. One layer: compiling costs
# most of this file's time.
COMPILED_CASES = [
    ("compiled gatedfwa, token shift", dict(attention_kinds="gatedfwa", window_size=5, token_shift=True,
                                            num_hidden_layers=1)),
]


def _loss_and_grads_packed(model, input_ids, labels, offsets):
    cu = torch.tensor(offsets, dtype=torch.int32)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=labels, cu_seq_lens_q=cu, cu_seq_lens_k=cu).loss
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _check_case(rank, case, seed, packed=False, compiled=False) -> list[str]:
    name, overrides = case
    torch.manual_seed(seed)
    model = GatedFWAForCausalLM(tiny_config(**overrides))  # the same weights on every rank
    generator = torch.Generator().manual_seed(seed + 1)
    rows = 1 if packed else 2
    input_ids = torch.randint(0, model.config.vocab_size, (rows, WORLD * SHARD), generator=generator)
    labels = input_ids.clone()
    # Ignored labels, one on each side of the shard boundary, so the token count differs
    # between the ranks and the label that crosses the boundary is an ignored one in row 1.
    labels[0, SHARD - 1] = -100
    labels[-1, SHARD] = -100
    if packed:
        single_loss, single_grads = _loss_and_grads_packed(model, input_ids, labels, PACKED_OFFSETS)
    else:
        single_loss, single_grads = _loss_and_grads(model, input_ids, labels)

    group = dist.group.WORLD
    enable_context_parallel(model, group)
    ids, shard_labels = shard_sequence(input_ids, group), shard_sequence(labels, group)
    if packed:
        loss, grads = _loss_and_grads_packed(model, ids, shard_labels, PACKED_OFFSETS)
    elif compiled:
        torch._dynamo.reset()
        loss, grads = _loss_and_grads(model, ids, shard_labels, torch.compile(model, fullgraph=True, backend="aot_eager"))
        torch._dynamo.reset()
    else:
        loss, grads = _loss_and_grads(model, ids, shard_labels)
    enable_context_parallel(model, None)
    dist.all_reduce(loss, group=group)
    loss /= WORLD
    failures = []
    for what, result, expected in [("loss", loss, single_loss)] + [
            (f"grad {p}", grads[p], single_grads[p]) for p in single_grads]:
        if what != "loss":
            dist.all_reduce(result, group=group)
            result /= WORLD
        try:
            torch.testing.assert_close(result, expected, **TOLERANCE)
        except AssertionError as error:
            failures.append(f"{name}: {what}: {error}")
    return failures


def _check_refusals(rank) -> list[str]:
    group = dist.group.WORLD
    failures = []
    for kind in ("full", "forgetting"):
        model = GatedFWAForCausalLM(tiny_config(attention_kinds=["gatedfwa", kind]))
        failures += _expect(ValueError, kind, lambda: enable_context_parallel(model, group))
    model = enable_context_parallel(GatedFWAForCausalLM(tiny_config()), group)
    ids = torch.randint(0, 61, (1, SHARD))
    failures += _expect(ValueError, "attention_mask", lambda: model(ids, attention_mask=torch.ones_like(ids)))
    failures += _expect(ValueError, "use_cache", lambda: model(ids, use_cache=True))
    failures += _expect(ValueError, "seq_idx", lambda: model(ids, seq_idx=torch.zeros_like(ids)))
    failures += _expect(ValueError, "multiple of the context-parallel group's size",
                        lambda: shard_sequence(torch.zeros(1, 5), group))
    return failures


def _check_all(rank, world, seed) -> list[str]:
    failures = []
    for i, case in enumerate(CASES):
        failures += _check_case(rank, case, seed + 10 * i)
    for i, case in enumerate(PACKED_CASES):
        failures += [f"packed: {f}" for f in _check_case(rank, case, seed + 100 + 10 * i, packed=True)]
    for i, case in enumerate(COMPILED_CASES):
        failures += [f"compiled: {f}" for f in _check_case(rank, case, seed + 200 + 10 * i, compiled=True)]
    return failures + [f"refusal: {f}" for f in _check_refusals(rank)]


_FAILURES: list[list[str]] = []  # the spawned run's failures, kept for the session (as in test_context_parallel.py)


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    if not _FAILURES:
        seed = zlib.crc32(b"model context-parallel") + torch.randint(0, 2**20, ()).item()
        _FAILURES.append(run_on_ranks(WORLD, _check_all, seed, tmp_path=tmp_path_factory.mktemp("model_cp")))
    return _FAILURES[0]


def test_loss_and_gradients_match_one_process(failures):
    mismatches = [f for f in failures if not any(tag in f for tag in ("refusal: ", "packed: ", "compiled: "))]
    assert not mismatches, "\n".join(mismatches)


def test_packed_sequences_match_one_process(failures):
    mismatches = [f for f in failures if "packed: " in f]
    assert not mismatches, "\n".join(mismatches)


def test_compiled_step_matches_one_process(failures):
    mismatches = [f for f in failures if "compiled: " in f]
    assert not mismatches, "\n".join(mismatches)


def test_unsupported_inputs_raise(failures):
    missing = [f for f in failures if "refusal: " in f]
    assert not missing, "\n".join(missing)
