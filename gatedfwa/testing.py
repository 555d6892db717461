"""Helpers for checking a fast path against the float64 reference (docs/correctness.md):

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


def assert_within_relative_rule(name: str, fast: torch.Tensor, naive_low: torch.Tensor, ref64: torch.Tensor) -> None:
    """assert_within_rule on errors relative to max(|ref64|, 1), for outputs that span many
    decades (a log gate from -3.6e21 to -1e-30 in one tensor): there a plain maximum would
    compare the rounding of the single largest element only."""
    scale = ref64.abs().clamp(min=1)
    assert_within_rule(name, fast.double() / scale, naive_low.double() / scale, ref64 / scale)


def assert_elementwise_close(name: str, fast: torch.Tensor, ref64: torch.Tensor, rtol: float) -> None:
    """|fast - ref64| <= rtol |ref64| + 1e-9 everywhere; the 1e-9 covers a float64 formula's own
    cancellation (~ |a| 1e-16 in the sharpened gate's beta gradient)."""
    excess = ((fast.double() - ref64).abs() - (rtol * ref64.abs() + 1e-9)).max().item()
    assert excess <= 0, f"{name}: elementwise error exceeds {rtol:.0e} relative by {excess:.3e}"


def assert_gate_results(label: str, names, fast, low, ref, extremes_rtol=None) -> None:
    """A gate's value and gradients (``fast``, in order of ``names``) against the float64
    formula ``ref`` and the same formula in the inputs' precision ``low``: finite everywhere,
    then the rule; at extreme inputs (``extremes_rtol(dtype)`` given) the rule on relative
    errors and an elementwise relative bound, since there the low-precision formula's own
    gradients overflow and the rule alone would bound nothing. The log gate is <= 0."""
    for name, x, y, z in zip(names, fast, low, ref):
        assert torch.isfinite(x).all(), f"{label}: {name} has non-finite entries"
        if extremes_rtol is not None:
            assert_within_relative_rule(name, x, y, z)
            assert_elementwise_close(name, x, z, extremes_rtol(x.dtype))
        else:
            assert_within_rule(name, x, y, z)
    assert (fast[0] <= 0).all(), f"{label}: a log gate is positive"


def op_modules() -> list:
    """Every module under gatedfwa.ops, imported: for tests and profilers that replace the
    Triton kernels they hold (import all first: a module imported after a patch would bind the
    patched helper and keep it)."""
    import importlib
    import pkgutil

    import gatedfwa.ops

    return [importlib.import_module(info.name) for info in pkgutil.walk_packages(gatedfwa.ops.__path__, "gatedfwa.ops.")]


def output_cache(output):
    """The decoding cache a model output carries. transformers renamed the field from
    ``past_key_values`` to ``cache`` in its 5.2x releases; tests run on both sides of that."""
    return output.cache if hasattr(output, "cache") else output.past_key_values
