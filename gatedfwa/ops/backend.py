"""Which implementation serves an op: the Triton kernels or the PyTorch path.

    "triton"  the kernels; the default for CUDA tensors. On CPU tensors they run under
              Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
    "torch"   the PyTorch path of each op (chunked, memory O(T * w)); the default elsewhere.

GATEDFWA_BACKEND=triton or GATEDFWA_BACKEND=torch forces one, for every op.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "BACKEND_VARIABLE", "select_backend"]

BACKENDS = ("triton", "torch")
BACKEND_VARIABLE = "GATEDFWA_BACKEND"


def select_backend(device: torch.device) -> str:
    """The backend that serves tensors on ``device``: GATEDFWA_BACKEND if set, otherwise
    Triton on CUDA and the PyTorch path everywhere else."""
    forced = os.environ.get(BACKEND_VARIABLE, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_VARIABLE} must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "triton" if device.type == "cuda" else "torch"
