"""Launch configuration of the NSA kernels: the tile sizes and warps of each kernel family
(compressed.py, selection.py, selected.py, selected_block_major.py's forward), how the
summaries' backward splits its queries, the compile-time arguments every kernel takes from the
layout, and output buffers. Tests and benchmarks replace CONFIGS, allocate_like and
allocate_indices through this module (benchmarks/bench_nsa.py --sweep tries other configs).
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.hardware import streaming_multiprocessors
from gatedfwa.ops.common.triton_support import cdiv, dot_precision, interpreting, next_power_of_2
from gatedfwa.ops.nsa.layout import SequenceLayout

__all__ = ["CONFIGS", "kernel_flags", "query_splits", "MIN_QUERY_SPAN", "allocate_like", "allocate_indices"]


def kernel_flags(layout, q: torch.Tensor) -> dict:
    """The compile-time arguments every NSA kernel takes from the layout (layout.py)."""
    return dict(GROUP=layout.group, GROUP_PAD=layout.group_pad, HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d,
                VARLEN=layout.varlen, DOT_PRECISION=dot_precision(q.dtype))


def _compressed_config(layout: SequenceLayout) -> dict:
    """ROWS query rows per program (at least one group), BLOCK_C summaries per tile."""
    if interpreting():
        return dict(ROWS=max(64, layout.group_pad), BLOCK_C=16, num_warps=4, num_stages=1)
    rows = max(64 if layout.block_d <= 128 else 32, layout.group_pad)
    return dict(ROWS=rows, BLOCK_C=64 if layout.block_d <= 128 else 32, num_warps=4, num_stages=2)


def _selection_config(layout: SequenceLayout) -> dict:
    """ROWS query rows per program (at least one group), BLOCK_C summaries per tile."""
    if interpreting():
        return dict(ROWS=max(64, layout.group_pad), BLOCK_C=16, num_warps=4, num_stages=1)
    if layout.block_d <= 128:
        # Chosen by `bench_nsa.py --sweep` on an H200 (benchmarks/results/nsa_sweep.md): at
        # D=128 smaller summary tiles with a deeper pipeline beat BLOCK_C=64 with 4 warps at
        # groups 1 and 16 (0.57 vs 0.88 ms and 0.27 vs 0.38 ms, T=8192).
        return dict(ROWS=max(16, layout.group_pad), BLOCK_C=32, num_warps=2, num_stages=3)
    return dict(ROWS=max(16, layout.group_pad), BLOCK_C=32, num_warps=4, num_stages=2)


def _selected_config(layout: SequenceLayout) -> dict:
    """ROWS query rows per program; BLOCK_K keys per tile (a block is one or more tiles)."""
    if interpreting():  # tests: 16-key tiles, so that a block larger than 16 keys takes several
        return dict(ROWS=max(64, layout.group_pad), BLOCK_K=16, num_warps=4, num_stages=1)
    block_k = max(16, min(64, next_power_of_2(layout.block_size)))
    return dict(ROWS=max(16, layout.group_pad), BLOCK_K=block_k, num_warps=4, num_stages=2)


def _block_major_config(layout: SequenceLayout) -> dict:
    """ROWS (query, head) rows per step of the forward's walk; BLOCK_K keys per program."""
    if interpreting():  # tests: 16-key tiles, so that a block larger than 16 keys takes several
        return dict(ROWS=max(16, layout.group_pad), BLOCK_K=16, num_warps=4, num_stages=1)
    block_k = max(16, min(64, next_power_of_2(layout.block_size)))
    return dict(ROWS=max(64, layout.group_pad), BLOCK_K=block_k, num_warps=4, num_stages=2)


# Each family's config(layout) -> dict(ROWS, BLOCK_C or BLOCK_K, num_warps, num_stages): the
# compressed branch (forward, dq, dk/dv), the selection, the query-major selected branch
# (forward, dq; and the block-major backward), the block-major selected forward.
CONFIGS = {"compressed": _compressed_config, "selection": _selection_config, "selected": _selected_config,
           "block_major": _block_major_config}


# Fewest queries per span of the summaries' backward: shorter spans re-read the same
# summary tile for too little work.
MIN_QUERY_SPAN = 256


def query_splits(layout: SequenceLayout, programs: int) -> tuple[int, int]:
    """(query_span, splits) for the summaries' backward: the queries of a sequence are cut into
    `splits` spans of query_span tokens, each a program of its own, so that a few summary
    tiles still fill the GPU (one tile per program would leave most SMs idle: T=8192 with 4
    kv heads has 8 tiles). About four waves of programs (the tiles' work is triangular: early
    summaries are seen by more queries), spans of at least MIN_QUERY_SPAN."""
    longest = max(layout.max_seqlen, 1)
    if interpreting():
        splits = min(3, cdiv(longest, 16))  # several spans even at the tests' sizes
    else:
        wanted = cdiv(4 * streaming_multiprocessors(layout.device), max(programs, 1))
        splits = max(1, min(wanted, cdiv(longest, MIN_QUERY_SPAN)))
    span = cdiv(longest, splits)
    return span, cdiv(longest, span)


def allocate_like(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised output buffer shaped like x. Tests replace this to
    fill outputs with NaN, which shows any element a kernel fails to write."""
    return torch.empty_like(x)


def allocate_indices(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uninitialised int32 index buffer. Tests replace this to fill it with a value no slot may
    keep, which shows any entry the kernel fails to write."""
    return torch.empty(shape, dtype=torch.int32, device=device)
