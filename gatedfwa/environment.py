"""Every environment variable gatedfwa reads: its name, meaning and default (``VARIABLES``),
and the one function that reads it. Nothing else in the package touches ``os.environ``
(tests/test_environment.py checks it), so this module is the whole list:

    GATEDFWA_BACKEND        forced_backend()           which implementation serves the ops
    GATEDFWA_CHECK_VALUES   check_values_on_device()   value checks on GPU tensors too
    GATEDFWA_HOPPER_KERNELS hopper_kernels()           which forward kernel runs on H100/H200
    TRITON_INTERPRET        triton_interpret()         Triton's CPU interpreter
    RANK                    rank()                     torchrun: this process's index
    WORLD_SIZE              world_size()               torchrun: how many processes
    LOCAL_RANK              local_rank()               torchrun: the index on this host
    LOCAL_WORLD_SIZE        local_world_size()         torchrun: processes on this host
    OMP_NUM_THREADS         omp_num_threads_is_set()   whether the CPU thread count was chosen
    HF_DATASETS_OFFLINE     forbid_dataset_downloads() set (unless set) for ``datasets``

GATEDFWA_BACKEND's values:

    auto (or unset)  the Triton kernels for CUDA tensors when Triton is installed, the
                     PyTorch path elsewhere (gatedfwa/ops/backend.py ``select_backend``)
    triton           the Triton kernels (CUDA tensors, or CPU tensors under Triton's
                     interpreter, TRITON_INTERPRET=1)
    torch            the PyTorch path

GATEDFWA_HOPPER_KERNELS's values (the window attention forward on compute capability 9):

    triton (or unset)  the Triton forward kernel (gatedfwa/ops/window_attention/forward.py)
    gluon              the warp-specialised Gluon kernel (gluon_forward.py) for the calls it
                       supports (fp16/bf16, D 64 or 128, as many queries as keys, no packed
                       sequences); every other call, and the backward, stays on Triton

A value that cannot be meant (a backend that does not exist, a RANK that is not a number)
raises ConfigError naming the variable and what it accepts. This module imports nothing
heavy, so that the command line checks the variables before torch loads
(:func:`check_environment`), and gatedfwa/ops can read them too.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from gatedfwa.errors import ConfigError

__all__ = [
    "Variable", "VARIABLES", "BACKEND", "CHECK_VALUES", "HOPPER_KERNELS", "HOPPER_KERNEL_CHOICES", "TRITON_INTERPRET",
    "RANK", "WORLD_SIZE", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "HF_DATASETS_OFFLINE",
    "forced_backend", "check_values_on_device", "hopper_kernels", "triton_interpret", "rank", "world_size",
    "local_rank",
    "local_world_size", "omp_num_threads_is_set", "forbid_dataset_downloads", "check_environment",
    "BACKENDS", "BACKEND_CHOICES", "BACKEND_VARIABLE", "HOW_TO_UNFORCE", "triton_missing",
]


@dataclass(frozen=True)
class Variable:
    """One environment variable: ``name``; ``default``, the value an unset variable stands for
    (None where the reader derives it, as its ``meaning`` says); ``meaning``, what it does."""

    name: str
    default: str | None
    meaning: str


BACKEND = Variable(
    "GATEDFWA_BACKEND", "auto",
    "which implementation serves every op: auto, triton or torch (a use_backend() context overrides it)")
CHECK_VALUES = Variable(
    "GATEDFWA_CHECK_VALUES", "0",
    "1: check the values of log gates, and that context-parallel shards agree, on GPU tensors too "
    "(a host sync per call; CPU tensors are always checked)")
HOPPER_KERNELS = Variable(
    "GATEDFWA_HOPPER_KERNELS", "triton",
    "which window attention forward kernel runs on H100/H200 (compute capability 9): triton, or gluon for "
    "the warp-specialised Gluon kernel where it supports the call (opt-in until a benchmark shows it faster)")
TRITON_INTERPRET = Variable(
    "TRITON_INTERPRET", "0",
    "1: Triton runs its kernels in its CPU interpreter (read once, when gatedfwa.ops loads)")
RANK = Variable("RANK", "0", "this process's index among all processes (set by torchrun)")
WORLD_SIZE = Variable("WORLD_SIZE", "1", "how many processes train together (set by torchrun)")
LOCAL_RANK = Variable(
    "LOCAL_RANK", None, "this process's index among those of its host, its GPU's index (set by torchrun; "
    "unset: RANK's value)")
LOCAL_WORLD_SIZE = Variable(
    "LOCAL_WORLD_SIZE", "1", "processes on this host, which share its RAM (set by torchrun)")
OMP_NUM_THREADS = Variable(
    "OMP_NUM_THREADS", None, "CPU threads per process; only whether it is set is read (set: torch follows it; "
    "unset: training on a CPU of at most 2 cores takes one thread, gatedfwa/train/threads.py)")
HF_DATASETS_OFFLINE = Variable(
    "HF_DATASETS_OFFLINE", "1", "not read but set, to 1 unless it is set, before --hf-dataset loads the "
    "'datasets' package: nothing is downloaded")

VARIABLES = (BACKEND, CHECK_VALUES, HOPPER_KERNELS, TRITON_INTERPRET, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
             OMP_NUM_THREADS, HF_DATASETS_OFFLINE)

BACKENDS = ("triton", "torch")
HOPPER_KERNEL_CHOICES = ("triton", "gluon")
BACKEND_CHOICES = ("auto", *BACKENDS)
BACKEND_VARIABLE = BACKEND.name
HOW_TO_UNFORCE = f"set {BACKEND_VARIABLE}=auto or {BACKEND_VARIABLE}=torch (or unset it) for the PyTorch path"


def _read(variable: Variable) -> str | None:
    """The variable's value; its default when unset."""
    return os.environ.get(variable.name, variable.default)


def _read_count(variable: Variable, minimum: int) -> int:
    """A whole number >= minimum; ConfigError naming the variable otherwise."""
    raw = _read(variable)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"{variable.name}={raw!r} must be a whole number >= {minimum}: {variable.meaning}")
    return value


def forced_backend() -> str | None:
    """The backend GATEDFWA_BACKEND forces ("triton" or "torch"), or None when it is unset
    or "auto"; ConfigError naming the accepted values for anything else. Case and spaces
    around the value do not matter."""
    raw = _read(BACKEND)
    forced = raw.strip().lower()
    if forced in ("", "auto"):
        return None
    if forced not in BACKENDS:
        raise ConfigError(
            f"{BACKEND_VARIABLE}={raw!r} is not a backend; accepted values: {', '.join(BACKEND_CHOICES)} "
            f"(auto: Triton for CUDA tensors, the PyTorch path elsewhere)"
        )
    return forced


def check_values_on_device() -> bool:
    """GATEDFWA_CHECK_VALUES=1: the ops check values of tensors off the CPU as well."""
    return _read(CHECK_VALUES) == "1"


def hopper_kernels() -> str:
    """GATEDFWA_HOPPER_KERNELS: "triton" (unset, the default) or "gluon"; ConfigError naming the
    accepted values for anything else. Case and spaces around the value do not matter."""
    raw = _read(HOPPER_KERNELS)
    choice = raw.strip().lower() or HOPPER_KERNELS.default
    if choice not in HOPPER_KERNEL_CHOICES:
        raise ConfigError(
            f"{HOPPER_KERNELS.name}={raw!r} is not a kernel family; accepted values: "
            f"{', '.join(HOPPER_KERNEL_CHOICES)} ({HOPPER_KERNELS.meaning})"
        )
    return choice


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in Triton's CPU interpreter."""
    return _read(TRITON_INTERPRET) == "1"


def rank() -> int:
    """This process's index among all (0 without torchrun)."""
    return _read_count(RANK, 0)


def world_size() -> int:
    """How many processes run together (1 without torchrun)."""
    return _read_count(WORLD_SIZE, 1)


def local_rank() -> int:
    """This process's index on its host (LOCAL_RANK; RANK's value when unset)."""
    return _read_count(LOCAL_RANK, 0) if LOCAL_RANK.name in os.environ else rank()


def local_world_size() -> int:
    """How many processes run on this host (1 without torchrun)."""
    return _read_count(LOCAL_WORLD_SIZE, 1)


def omp_num_threads_is_set() -> bool:
    """Whether OMP_NUM_THREADS is set (whatever its value: torch reads the value itself)."""
    return _read(OMP_NUM_THREADS) is not None


def forbid_dataset_downloads() -> None:
    """Set HF_DATASETS_OFFLINE=1 unless it is set, before the ``datasets`` package loads (it
    reads the variable on import), so that a dataset comes from the local cache or not at all."""
    os.environ.setdefault(HF_DATASETS_OFFLINE.name, HF_DATASETS_OFFLINE.default)


def triton_missing() -> ConfigError:
    """The error for GATEDFWA_BACKEND=triton without Triton."""
    return ConfigError(f"{BACKEND_VARIABLE}=triton asks for the Triton kernels, but Triton is not installed: "
                       f"pip install triton, or {HOW_TO_UNFORCE}")


def check_environment() -> None:
    """The checks of the variables that need no tensor, without importing torch or Triton:
    GATEDFWA_BACKEND's value, "triton" while Triton is not installed, GATEDFWA_HOPPER_KERNELS's
    value, and torchrun's numbers."""
    if forced_backend() == "triton" and importlib.util.find_spec("triton") is None:
        raise triton_missing()
    hopper_kernels()
    rank()
    world_size()
    local_rank()
    local_world_size()
