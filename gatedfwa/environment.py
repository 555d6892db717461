"""GATEDFWA_BACKEND: the environment variable that forces the implementation of every op.

    auto (or unset)  the Triton kernels for CUDA tensors when Triton is installed, the
                     PyTorch path elsewhere (gatedfwa/ops/backend.py ``select_backend``)
    triton           the Triton kernels (CUDA tensors, or CPU tensors under Triton's
                     interpreter, TRITON_INTERPRET=1)
    torch            the PyTorch path

It lives outside gatedfwa/ops (whose package imports torch) and imports nothing heavy, so
that the command line checks the variable before torch loads.
"""

from __future__ import annotations

import importlib.util
import os

from gatedfwa.errors import ConfigError

__all__ = ["BACKENDS", "BACKEND_CHOICES", "BACKEND_VARIABLE", "forced_backend", "triton_missing",
           "check_backend_variable", "HOW_TO_UNFORCE"]

BACKENDS = ("triton", "torch")
BACKEND_CHOICES = ("auto", *BACKENDS)
BACKEND_VARIABLE = "GATEDFWA_BACKEND"
HOW_TO_UNFORCE = f"set {BACKEND_VARIABLE}=auto or {BACKEND_VARIABLE}=torch (or unset it) for the PyTorch path"


def forced_backend() -> str | None:
    """The backend GATEDFWA_BACKEND forces ("triton" or "torch"), or None when it is unset
    or "auto"; ConfigError naming the accepted values for anything else."""
    raw = os.environ.get(BACKEND_VARIABLE, "")
    forced = raw.strip().lower()
    if forced in ("", "auto"):
        return None
    if forced not in BACKENDS:
        raise ConfigError(
            f"{BACKEND_VARIABLE}={raw!r} is not a backend; accepted values: {', '.join(BACKEND_CHOICES)} "
            f"(auto: Triton for CUDA tensors, the PyTorch path elsewhere)"
        )
    return forced


def triton_missing() -> ConfigError:
    """The error for GATEDFWA_BACKEND=triton without Triton."""
    return ConfigError(f"{BACKEND_VARIABLE}=triton asks for the Triton kernels, but Triton is not installed: "
                       f"pip install triton, or {HOW_TO_UNFORCE}")


def check_backend_variable() -> None:
    """The checks of the variable that need no tensor, without importing Triton: a bad
    value, or "triton" while Triton is not installed."""
    if forced_backend() == "triton" and importlib.util.find_spec("triton") is None:
        raise triton_missing()
