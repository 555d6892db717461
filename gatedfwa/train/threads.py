"""How many CPU threads one training process computes with (torch's intra-op threads).

PyTorch starts one thread per core, and the threads of one matrix product wait for each
other: when another program takes one of two cores, every product runs at the pace of the
thread that shares it. The ``cpu`` preset, tokens/s (medians of 16- to 20-step runs):

    2 cores                                    1 thread    2 threads
    idle (2 cores of a 16-core machine)           5,240        9,750
    one other busy program on them                5,100          570
    two other busy programs on them               2,540        3,980
    a 2-core machine shared with other jobs       1,780    620-1,670

One thread is at most 1.9x slower than two, two can be 9x slower than one; so the default
("auto", ``threads=None``) is:

* one thread when training on the CPU with at most 2 cores usable by this process;
* otherwise torch's own choice, which already follows ``OMP_NUM_THREADS`` when it is set
  (torchrun sets it to 1 for several processes) and else takes one thread per core.

``--threads N`` (``threads=N``) sets the count on any device. The thread count can change
float sums in the last bits, which is why it is fixed by the machine and not by its load:
a resumed run on the same machine with the same setting continues bit for bit.
"""

from __future__ import annotations

import os

import torch

from gatedfwa.environment import omp_num_threads_is_set

__all__ = ["usable_cores", "choose_threads", "SMALL_MACHINE_CORES"]

SMALL_MACHINE_CORES = 2  # at most this many cores: one thread by default on the CPU


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this system (macOS, Windows)
        return os.cpu_count() or 1


def choose_threads(requested: int | None, device: torch.device) -> int:
    """The intra-op thread count for training on ``device``: ``requested`` when given,
    else the automatic choice of the module docstring."""
    if requested is not None:
        return requested
    if device.type == "cpu" and not omp_num_threads_is_set() and usable_cores() <= SMALL_MACHINE_CORES:
        return 1
    return torch.get_num_threads()
