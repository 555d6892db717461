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


__all__ = ["triton", "tl", "jit", "constexpr"]
