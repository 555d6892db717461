"""What every kernel module shares: Triton itself (optional), the interpreter switch, constants,
and small host-side helpers.

Triton is optional: CUDA users have it through PyTorch, CPU users may not. Kernel modules
import it from here; without it, `jit` leaves functions as plain Python (never launched) and
every op takes its PyTorch path.

Triton's interpreter (TRITON_INTERPRET=1, read by Triton when a kernel is decorated) runs the
kernels on the CPU with numpy. Its bfloat16 arithmetic and the type of its comparisons differ
from the GPU's; importing this module while the interpreter is on corrects both
(`patch_interpreter_bfloat16`, `patch_interpreter_comparisons`), so that no interpreted kernel
returns a silently wrong answer or fails where the compiled one runs.
"""

from __future__ import annotations

from gatedfwa.environment import triton_interpret

try:
    import triton
    import triton.language as tl

    jit = triton.jit
    constexpr = tl.constexpr
except ImportError:
    triton = tl = None

    def jit(fn=None, **options):
        # As triton.jit, bare or with options (do_not_specialize, ...), which do not apply here.
        return fn if fn is not None else (lambda function: function)

    def constexpr(value):
        return value


LOG2E = 1.4426950408889634
"""log2(e): the kernels take exponentials with exp2, so logits and gate sums are scaled by it."""
LN2 = 0.6931471805599453
"""ln(2): turns the kernels' base-2 log-sum-exp back into natural log."""
LOG2E_CONSTEXPR = constexpr(LOG2E)
"""LOG2E for use inside kernels (Triton reads only constexpr globals there)."""

# Triton decides at decoration time whether its kernels are interpreted; read the switch once.
_INTERPRETING = triton_interpret()


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def dot_precision(dtype) -> str:
    """input_precision of the kernels' tl.dot for operands of this dtype: float32 inputs get
    full-precision products (tf32 would cost ~1e-3 relative error); fp16/bf16 are exact in
    either mode."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions in
# Triton 3.x, and calling them from Python costs microseconds each (they unwrap every
# argument); launches compute grids on every call, so these plain versions keep that cheap.


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling of numerator / denominator for integers, denominator > 0."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def token_and_head_strides(x: torch.Tensor) -> tuple[int, int]:
    """(token stride, head stride) of a contiguous [B, T, H, D] tensor, for the kernels'
    flattened token index b * T + t. A contiguous tensor may carry any stride in a dimension
    of size 1, so with T == 1 the token stride is the batch stride."""
    return (x.stride(0) if x.shape[1] == 1 else x.stride(1)), x.stride(2)


def patch_interpreter_bfloat16() -> None:
    """Make Triton's CPU interpreter treat bfloat16 as the GPU does.

    The interpreter keeps bfloat16 blocks as uint16 bit patterns and (1) hands them to numpy's
    matmul unconverted, so a bf16 tl.dot returns numbers off by orders of magnitude, and (2)
    casts float32 to bfloat16 by truncation, where the GPU rounds to nearest even (a
    probability of 0.9999 becomes 0.996). Compiled kernels are unaffected. This widens bf16
    dot operands to float32 (exact) and rounds float32 -> bf16 casts to nearest even.
    Idempotent; a no-op without Triton. Called on import when the interpreter is on.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_gatedfwa_bfloat16_patched", False):
        return
    original_dot = builder.create_dot
    original_cast = builder.cast_impl

    def widen(handle):
        if handle.dtype == tl.bfloat16:
            as_float = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(as_float, tl.float32)
        return handle

    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), d, *args, **kwargs)

    def cast_impl(self, src, dst_type, *args, **kwargs):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type, *args, **kwargs)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._gatedfwa_bfloat16_patched = True


def patch_interpreter_comparisons() -> None:
    """Make comparisons in Triton's CPU interpreter yield booleans, as they do on the GPU.

    The interpreter gives a comparison the type of its left operand, so `n > 3` on an int32
    scalar holds int32 data; newer interpreters (3.7 and later) keep that through `&` with a
    block of booleans, and a load masked by the result fails with "mask has unsupported
    dtype". This returns every comparison as int1 with boolean data. Idempotent; a no-op
    without Triton. Called on import when the interpreter is on.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_gatedfwa_comparisons_patched", False):
        return

    def boolean_result(compare):
        def create(self, lhs, rhs):
            result = compare(self, lhs, rhs)
            return interpreter.TensorHandle(np.asarray(result.data).astype(np.bool_), tl.int1)

        return create

    for name in dir(builder):
        if name.startswith(("create_icmp", "create_fcmp")):
            setattr(builder, name, boolean_result(getattr(builder, name)))
    builder._gatedfwa_comparisons_patched = True


if _INTERPRETING and triton is not None:
    patch_interpreter_bfloat16()
    patch_interpreter_comparisons()


__all__ = [
    "triton", "tl", "jit", "constexpr", "LOG2E", "LN2", "LOG2E_CONSTEXPR", "interpreting", "dot_precision",
    "cdiv", "next_power_of_2", "token_and_head_strides", "patch_interpreter_bfloat16", "patch_interpreter_comparisons",
]
