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


def float32_slack(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """The rule's absolute slack: 1e-5, or in float32 1e-5 * max|reference| (at least 1e-5).

    In float32 the naive path is nearly exact at test sizes, and a fixed 1e-5 is below the
    rounding of a decay sum of magnitude ~100 (strong gates over one tile) times a gradient
    of magnitude ~1; the slack is then taken relative to the reference's largest value."""
    if dtype != torch.float32 or reference.numel() == 0:
        return 1e-5
    finite = reference[torch.isfinite(reference)]
    return 1e-5 * max(1.0, finite.abs().max().item() if finite.numel() else 1.0)


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


def patch_triton_interpreter_bf16() -> None:
    """Make Triton's CPU interpreter treat bfloat16 like the GPU does.

    The interpreter (Triton <= 3.6) keeps bfloat16 blocks as uint16 bit patterns and (1)
    hands them to numpy's matmul unconverted, so every bf16 tl.dot returns garbage, and (2)
    casts float32 to bfloat16 by truncation, where the GPU rounds to nearest even (a
    probability of 0.9999 becomes 0.996). Compiled kernels are unaffected. This widens bf16
    dot operands to float32 (exact) and rounds float32 -> bf16 casts to nearest even. It is
    idempotent and harmless where the interpreter is unused.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_gatedfwa_bf16_fix", False):
        return
    original_dot = builder.create_dot
    original_cast = builder.cast_impl

    def widen(handle):
        if handle.dtype == tl.bfloat16:
            as_float = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(as_float, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._gatedfwa_bf16_fix = True
