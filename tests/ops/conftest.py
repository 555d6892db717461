"""Fixtures shared by the tests of every op family (tests/ops/<family>/conftest.py holds each
family's own)."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def benchmark_script():
    """load(name) -> benchmarks/<name>.py imported as a module (the benchmarks are scripts,
    not a package), for tests of their bookkeeping."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPOSITORY / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def override_tuning():
    """override(tuning, **changes): an op family's launch choices changed as
    tuning.overridden(**changes) does (gatedfwa/ops/common/tuning.py), until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda tuning, **changes: stack.enter_context(tuning.overridden(**changes))
