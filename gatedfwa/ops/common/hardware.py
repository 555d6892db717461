"""What launch configurations ask of the GPU they run on."""

from __future__ import annotations

import functools

import torch

__all__ = ["streaming_multiprocessors"]


def streaming_multiprocessors(device: torch.device) -> int:
    """The SMs of a CUDA device (1 elsewhere): roughly the programs one wave of a launch runs,
    which the launchers use to cut work into enough programs to fill the GPU."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    # Looked up once per GPU: a decode step asks on every layer of every step.
    return torch.cuda.get_device_properties(index).multi_processor_count
