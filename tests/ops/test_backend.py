"""use_backend(): a context that picks the ops' implementation over GATEDFWA_BACKEND."""

import pytest
import torch

import gatedfwa
from gatedfwa.errors import ConfigError
from gatedfwa.ops.backend import select_backend, use_backend
from gatedfwa.ops.common.triton_support import triton

needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed")


@needs_triton
def test_the_context_wins_over_the_variable_and_nests(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setenv("GATEDFWA_BACKEND", "torch")
    assert select_backend(cuda) == "torch"
    with use_backend("triton"):
        assert select_backend(cuda) == "triton"
        with use_backend("auto"):  # the default choice, whatever the variable says
            assert select_backend(cuda) == "triton" and select_backend(cpu) == "torch"
        with use_backend("torch"):
            assert select_backend(cuda) == "torch"
        assert select_backend(cuda) == "triton"
    assert select_backend(cuda) == "torch"
    assert gatedfwa.use_backend is use_backend


@needs_triton
def test_compiled_code_follows_the_context():
    """torch.compile guards on the context's choice: a later call under another choice
    recompiles instead of running the backend it was traced with."""
    seen = []

    def record(x):
        seen.append(select_backend(torch.device("cuda")))
        return x + 1

    compiled = torch.compile(record, backend="eager", fullgraph=True)
    x = torch.zeros(2)
    with use_backend("torch"):
        compiled(x)
    with use_backend("triton"):
        compiled(x)
    assert seen == ["torch", "triton"]


def test_a_backend_name_is_checked():
    with pytest.raises(ValueError, match="backend must be one of auto, triton, torch; got 'cuda'"):
        with use_backend("cuda"):
            pass


def test_the_context_leaves_the_variable_checks_to_the_variable(monkeypatch):
    monkeypatch.setenv("GATEDFWA_BACKEND", "fast")
    with use_backend("torch"):  # the context decides; the variable is not read
        assert select_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="is not a backend"):
        select_backend(torch.device("cpu"))
