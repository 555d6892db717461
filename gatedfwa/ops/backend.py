"""Which implementation serves an op: the Triton kernels or the PyTorch path.

    "triton"  the kernels; the default for CUDA tensors when Triton is installed. On CPU
              tensors they run under Triton's interpreter (TRITON_INTERPRET=1), which the
              tests use.
    "torch"   the PyTorch path of each op (chunked, memory O(T * w)); the default elsewhere.

GATEDFWA_BACKEND=triton or GATEDFWA_BACKEND=torch forces one, for every op; "auto" (or the
variable unset) picks as above (gatedfwa/backend_variable.py reads it). A value that is not
one of these, or "triton" where the kernels cannot run (Triton not installed, or tensors off
the GPU without the interpreter), raises ConfigError saying what to set instead.
"""

from __future__ import annotations

import torch

from gatedfwa.backend_variable import BACKEND_VARIABLE, BACKENDS, HOW_TO_UNFORCE, forced_backend, triton_missing
from gatedfwa.errors import ConfigError
from gatedfwa.ops.triton_support import interpreting, triton

__all__ = ["BACKENDS", "BACKEND_VARIABLE", "select_backend"]


def select_backend(device: torch.device) -> str:
    """The backend that serves tensors on ``device``: GATEDFWA_BACKEND if set, otherwise
    Triton on CUDA (when installed) and the PyTorch path everywhere else."""
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if triton is None:
            raise triton_missing()
        if device.type != "cuda" and not interpreting():
            raise ConfigError(
                f"{BACKEND_VARIABLE}=triton: the Triton kernels need CUDA tensors, these are on {device.type}: "
                f"run on a GPU, {HOW_TO_UNFORCE}, or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU "
                f"interpreter (slow)"
            )
        return "triton"
    return "triton" if device.type == "cuda" and triton is not None else "torch"
