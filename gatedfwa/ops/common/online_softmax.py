"""The online softmax the attention kernels fold their key tiles with (the NSA kernels and the
decode step; the window forward writes the same step out, with the gate's decay folded in),
and its epilogue (all of them).

Logits are in base 2 (multiplied by log2(e) once), so exp2 and log2 apply, and the log-sum-exp
comes out as lse2 = lse * log2(e). A program keeps per row the running maximum row_max, the
running sum of exp2(logit - row_max) row_sum, and the unnormalised output acc [ROWS, BLOCK_D]
float32; each tile rescales them to its new maximum and adds its own terms.
"""

from __future__ import annotations

# Triton is optional: without it these functions are defined but never compiled.
from gatedfwa.ops.common.triton_support import jit, tl

__all__ = ["softmax_step", "softmax_output", "softmax_lse"]


@jit
def softmax_step(acc, row_max, row_sum, s, v, DOT_PRECISION: tl.constexpr):
    """Fold a tile of base-2 logits s [ROWS, N] (-inf where masked) and its values
    v [N, BLOCK_D] into the running (acc, row_max, row_sum); returns them.

    A row that has seen no visible key keeps max = -inf and subtracts 0 instead, so that
    exp2(-inf - 0) = 0 rather than NaN."""
    new_max = tl.maximum(row_max, tl.max(s, 1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.math.exp2(s - safe_max[:, None])
    correction = tl.math.exp2(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


# The epilogue is two functions, so that a kernel may store its output before it forms the
# log-sum-exp: the order the window forward kernel is tuned in (computing lse2 first changes
# its compiled code).


@jit
def softmax_output(acc, row_sum):
    """The normalised output o [ROWS, BLOCK_D] float32 of the running softmax; rows without any
    visible key (row_sum 0) give 0."""
    has_keys = row_sum > 0.0
    return acc / tl.where(has_keys, row_sum, 1.0)[:, None]


@jit
def softmax_lse(row_max, row_sum):
    """lse2 [ROWS], the base-2 log-sum-exp of the running softmax; -inf for rows without any
    visible key."""
    has_keys = row_sum > 0.0
    lse = row_max + tl.math.log2(tl.where(has_keys, row_sum, 1.0))
    return tl.where(has_keys, lse, float("-inf"))
