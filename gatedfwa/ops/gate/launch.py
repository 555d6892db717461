"""Launch configuration of the gate kernels (kernels.py): the family's tuning surface (TUNING:
how many elements a program takes and its warps, per architecture), the block shape and grid
that follow, and output buffers. Tests and benchmarks change the program size through
TUNING.overridden(...) (gatedfwa/ops/common/tuning.py) and replace allocate through this module."""

from __future__ import annotations

import torch

from gatedfwa.ops.common.triton_support import cdiv, next_power_of_2
from gatedfwa.ops.common.tuning import Tuning, architecture

__all__ = ["TUNING", "program_config", "launch_shape", "allocate"]


def _elementwise_rule(arch: str) -> dict:
    """ELEMENTS (rows x heads) each program of the forward and backward handles, and its
    warps: on an H200 the backward was fastest with 1024 (4 warps) of 1024-8192 elements and
    2-16 warps, at B*T*H = 2^19 and 2^23."""
    return dict(ELEMENTS=1024, num_warps=4)


TUNING = Tuning("gate", key_names=(), rules={"elementwise": _elementwise_rule})


def program_config(device: torch.device) -> dict:
    """TUNING's program size and warps of the gate kernels on `device`'s architecture."""
    return TUNING.config("elementwise", architecture(device))


def launch_shape(num_rows: int, num_heads: int, elements_per_program: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_H, programs) for a [num_rows, num_heads] view: all heads in one
    block, as many rows as make up about elements_per_program elements."""
    block_h = next_power_of_2(max(num_heads, 1))
    block_rows = max(1, min(next_power_of_2(max(num_rows, 1)), elements_per_program // block_h))
    return block_rows, block_h, cdiv(num_rows, block_rows)


def allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer. Tests replace this to fill outputs with NaN, which shows
    any element a kernel fails to write."""
    return torch.empty(shape, dtype=dtype, device=device)
