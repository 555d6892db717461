"""Which implementation serves an op: the Triton kernels or the PyTorch path.

    "triton"  the kernels; the default for CUDA tensors when Triton is installed. On CPU
              tensors they run under Triton's interpreter (TRITON_INTERPRET=1), which the
              tests use.
    "torch"   the PyTorch path of each op (chunked, memory O(T * w)); the default elsewhere.

GATEDFWA_BACKEND=triton or GATEDFWA_BACKEND=torch forces one, for every op; "auto" (or the
variable unset) picks as above (gatedfwa/environment.py reads it). Inside
``with use_backend("torch"):`` (or "triton", "auto") the context's choice wins over the
variable until the context ends. Like the variable, the choice is the process's (not one
thread's): it is a plain module global so that torch.compile reads it while tracing and
guards on it, recompiling when a later call runs under another choice. A value that is not
one of these, or "triton" where the kernels cannot run (Triton not installed, or tensors off
the GPU without the interpreter), raises ConfigError saying what to set instead.
"""

from __future__ import annotations

import contextlib

import torch

from gatedfwa.environment import BACKEND_VARIABLE, BACKENDS, HOW_TO_UNFORCE, forced_backend, triton_missing
from gatedfwa.errors import ConfigError
from gatedfwa.ops.common.triton_support import interpreting, triton

__all__ = ["BACKENDS", "BACKEND_VARIABLE", "select_backend", "use_backend"]

# The backend the innermost use_backend() context forces: "triton", "torch", "auto", or None
# outside any.
_context_backend: str | None = None


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops in this context on ``name``: "triton", "torch", or "auto" (the default
    choice, whatever GATEDFWA_BACKEND says). Contexts nest; leaving one restores the outer
    choice. ValueError for any other name."""
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"use_backend: backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    global _context_backend
    outer, _context_backend = _context_backend, name
    try:
        yield
    finally:
        _context_backend = outer


def _forced() -> str | None:
    """The backend forced by the innermost use_backend() context, else by GATEDFWA_BACKEND."""
    if _context_backend is None:
        return forced_backend()
    return None if _context_backend == "auto" else _context_backend


def select_backend(device: torch.device) -> str:
    """The backend that serves tensors on ``device``: GATEDFWA_BACKEND if set, otherwise
    Triton on CUDA (when installed) and the PyTorch path everywhere else. A use_backend()
    context overrides the variable."""
    forced = _forced()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if triton is None:
            raise triton_missing()
        if device.type != "cuda" and not interpreting():
            raise ConfigError(
                f"{BACKEND_VARIABLE}=triton (or use_backend('triton')): the Triton kernels need CUDA tensors, these are on {device.type}: "
                f"run on a GPU, {HOW_TO_UNFORCE}, or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU "
                f"interpreter (slow)"
            )
        return "triton"
    return "triton" if device.type == "cuda" and triton is not None else "torch"
