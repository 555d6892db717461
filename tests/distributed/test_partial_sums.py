"""add_parts (gatedfwa/distributed/partial_sums.py): the parts of a bfloat16 gradient are
summed in float32 and rounded once, however many there are and however they overlap."""

from __future__ import annotations

import pytest
import torch

from gatedfwa.distributed.partial_sums import add_parts


def _parts(rows: int, spans, dtype, generator):
    return [(start, end, [torch.randn(2, end - start, 3, generator=generator).to(dtype)]) for start, end in spans]


# (rows, spans): one part; overlapping parts (a window over several shards); disjoint groups
# (first rows and tail rows); a part covering everything; an empty part.
SPANS = [
    (10, [(6, 10)]),
    (10, [(2, 10), (5, 10), (0, 4)]),
    (12, [(0, 3), (8, 12), (9, 12)]),
    (6, [(0, 6), (0, 6), (0, 6)]),
    (6, [(3, 3), (1, 4)]),
]


@pytest.mark.parametrize("rows,spans", SPANS)
def test_bfloat16_parts_are_rounded_once(rows, spans):
    generator = torch.Generator().manual_seed(rows + len(spans))
    grad = torch.randn(2, rows, 3, generator=generator).bfloat16()
    parts = _parts(rows, spans, torch.bfloat16, generator)
    exact = grad.double()
    for start, end, (piece,) in parts:
        exact[:, start:end] += piece.double()
    add_parts([grad], parts)
    # float32 holds these sums of at most 4 bf16 values of similar size exactly, so the
    # result is the exact sum rounded once.
    assert torch.equal(grad, exact.bfloat16())


def test_one_add_at_a_time_rounds_more():
    """What add_parts replaces: with three parts on the same rows, adding them one at a time
    in bfloat16 gives a different (less exact) result on some elements."""
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(4, 64, 8, generator=generator).bfloat16()
    parts = [(0, 64, [torch.randn(4, 64, 8, generator=generator).bfloat16()]) for _ in range(3)]
    exact = grad.double() + sum(p[2][0].double() for p in parts)
    sequential = grad.clone()
    for _, _, (piece,) in parts:
        sequential += piece
    summed = grad.clone()
    add_parts([summed], parts)
    assert torch.equal(summed, exact.bfloat16())
    assert not torch.equal(sequential, summed)
    assert (sequential.double() - exact).abs().sum() > (summed.double() - exact).abs().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_gradients_take_the_parts_in_place(dtype):
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(2, 8, 3, generator=generator).to(dtype)
    parts = _parts(8, [(0, 5), (3, 8)], dtype, generator)
    expected = grad.clone()
    for start, end, (piece,) in parts:
        expected[:, start:end] += piece
    storage = grad.data_ptr()
    add_parts([grad], parts)
    assert grad.data_ptr() == storage
    assert torch.equal(grad, expected)


def test_several_gradients_each_take_their_piece():
    generator = torch.Generator().manual_seed(2)
    grads = [torch.zeros(1, 4, 2).bfloat16(), torch.zeros(1, 4, 5)]
    pieces = [torch.randn(1, 2, 2, generator=generator).bfloat16(), torch.randn(1, 2, 5, generator=generator)]
    add_parts(grads, [(2, 4, pieces)])
    assert torch.equal(grads[0][:, 2:], pieces[0]) and torch.equal(grads[1][:, 2:], pieces[1])
    assert not grads[0][:, :2].any() and not grads[1][:, :2].any()
