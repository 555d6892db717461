"""Adding the parts of a gradient computed in several places, rounded once.

Under context parallelism the gradient of a key (value, gate) near a shard boundary is the
sum of parts computed apart: this rank's own part, the part of the first rows' call on the
fused path, and the parts later ranks send back for the shard's tail (several when the window
spans several shards). In bfloat16 each in-place `grad += part` rounds to 8 bits of mantissa:
a row with k extra parts is rounded k more times than on one process. add_parts sums every
part of a row range in float32 and rounds once, so the sum itself costs one rounding however
many parts there are (the parts arrive already rounded to their own dtype).
"""

from __future__ import annotations

import torch

__all__ = ["Part", "add_parts"]

# (start, end, pieces): pieces[i] [B, end - start, ...] is to be added to rows [start, end) of
# grads[i].
Part = tuple[int, int, list[torch.Tensor]]


def _merged_spans(parts: list[Part]) -> list[tuple[int, int]]:
    """The disjoint row ranges [start, end) that the parts cover, in order."""
    spans: list[list[int]] = []
    for start, end, _ in sorted(parts, key=lambda part: part[0]):
        if start == end:
            continue
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return [(start, end) for start, end in spans]


def add_parts(grads: list[torch.Tensor], parts: list[Part]) -> None:
    """Add every part in place to grads ([B, T, ...] each, along dim 1). Where a grad holds
    fewer bits than float32, each row range the parts cover is summed in float32 (the grad's
    rows and every part over them) and written back once; float32 and float64 grads take the
    parts in place directly."""
    spans = _merged_spans(parts)
    for i, grad in enumerate(grads):
        if grad.dtype in (torch.float32, torch.float64):
            for start, end, pieces in parts:
                grad[:, start:end] += pieces[i]
            continue
        for lo, hi in spans:
            total = grad[:, lo:hi].float()
            for start, end, pieces in parts:
                if lo <= start and end <= hi and start < end:
                    total[:, start - lo:end - lo] += pieces[i]
            grad[:, lo:hi] = total
