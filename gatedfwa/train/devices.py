"""Device choice for the commands: ``--device auto|cpu|cuda|cuda:N`` -> a torch.device.

Shared by ``gatedfwa train`` (each process picks its GPU by its local rank) and
``gatedfwa generate``.
"""

from __future__ import annotations

import torch

from gatedfwa.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: the GPU of this process (cuda:local_rank) when CUDA is available, else the
    CPU; ``cuda`` without an index is cuda:local_rank. ConfigError for an unknown name or a
    CUDA device on a machine without one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
