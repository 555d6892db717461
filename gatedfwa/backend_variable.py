"""The old home of the GATEDFWA_BACKEND reader, now gatedfwa/environment.py; kept while
gatedfwa/ops/backend.py imports from here."""

from gatedfwa.environment import BACKEND_VARIABLE, BACKENDS, HOW_TO_UNFORCE, forced_backend, triton_missing

__all__ = ["BACKEND_VARIABLE", "BACKENDS", "HOW_TO_UNFORCE", "forced_backend", "triton_missing"]
