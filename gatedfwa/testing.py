"""Helpers for checking a fast path against the float64 reference (DESIGN rule, section 4):

    max|fast - ref64| <= factor * max|naiveP - ref64| + atol

where naiveP is the naive path run in the fast path's precision P. The bound scales with the
error precision P causes by itself, so the same rule serves fp32, fp16 and bf16.
"""

from __future__ import annotations

import torch


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in float64; inf if x holds a NaN or inf where ref is finite."""
    diff = (x.double() - ref.double()).abs()
    if diff.numel() == 0:
        return 0.0
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item()


def assert_within_rule(
    name: str,
    fast: torch.Tensor,
    naive_low: torch.Tensor,
    ref64: torch.Tensor,
    factor: float = 2.0,
    atol: float = 1e-5,
) -> None:
    """Raise AssertionError unless fast is within ``factor`` times naive_low's error (+ atol)."""
    if fast.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref64.shape)}")
    fast_err = max_abs_error(fast, ref64)
    naive_err = max_abs_error(naive_low, ref64)
    bound = factor * naive_err + atol
    if not fast_err <= bound:
        raise AssertionError(
            f"{name}: max error {fast_err:.3e} exceeds {factor} x naive error {naive_err:.3e} + {atol:.0e}"
        )


def poison_(*tensors: torch.Tensor) -> None:
    """Fill floating tensors with NaN in place, so that an element a kernel fails to write shows."""
    for t in tensors:
        if t is not None and t.is_floating_point():
            t.fill_(float("nan"))
