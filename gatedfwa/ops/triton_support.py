"""Triton is optional: CUDA users have it through PyTorch, CPU users may not. Kernel modules
import it from here; without it, `jit` leaves functions as plain Python (never launched)
and every op takes its PyTorch path."""

try:
    import triton
    import triton.language as tl

    jit = triton.jit
    constexpr = tl.constexpr
except ImportError:
    triton = tl = None

    def jit(fn):
        return fn

    def constexpr(value):
        return value




# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions in
# Triton 3.x, and calling them from Python costs microseconds each (they unwrap every
# argument); launches compute grids on every call, so these plain versions keep that cheap.


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling of numerator / denominator for integers, denominator > 0."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


__all__ = ["triton", "tl", "jit", "constexpr", "cdiv", "next_power_of_2"]
