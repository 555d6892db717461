"""Launch configuration of the gate kernels (kernels.py): how many elements a program takes,
its warps, the block shape and grid that follow, and output buffers. Tests and benchmarks
replace ELEMENTS_PER_PROGRAM and allocate through this module."""

from __future__ import annotations

import torch

from gatedfwa.ops.common.triton_support import cdiv, next_power_of_2

__all__ = ["ELEMENTS_PER_PROGRAM", "NUM_WARPS", "launch_shape", "allocate"]

# Elements (rows x heads) each program handles: on an H200 the backward was fastest with 1024
# (4 warps) of 1024-8192 elements and 2-16 warps, at B*T*H = 2^19 and 2^23. Tests lower it to
# get many programs and ragged tails.
ELEMENTS_PER_PROGRAM = 1024
NUM_WARPS = 4


def launch_shape(num_rows: int, num_heads: int, elements_per_program: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_H, programs) for a [num_rows, num_heads] view: all heads in one
    block, as many rows as make up about elements_per_program elements (default
    ELEMENTS_PER_PROGRAM)."""
    block_h = next_power_of_2(max(num_heads, 1))
    elements = elements_per_program or ELEMENTS_PER_PROGRAM
    block_rows = max(1, min(next_power_of_2(max(num_rows, 1)), elements // block_h))
    return block_rows, block_h, cdiv(num_rows, block_rows)


def allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer. Tests replace this to fill outputs with NaN, which shows
    any element a kernel fails to write."""
    return torch.empty(shape, dtype=dtype, device=device)
