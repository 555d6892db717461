"""Launch configuration of the NSA kernels: the family's tuning surface (TUNING: the tile sizes
and warps of each kernel family, compressed.py, selection.py, selected.py and
selected_block_major.py's forward; how the summaries' backward splits its queries; how long a
block-major work item may be; the group sizes that run the selected branch block-major), the
compile-time arguments every kernel takes from the layout, and output buffers. Tests and
benchmarks change launch choices through TUNING.overridden(...)
(gatedfwa/ops/common/tuning.py; benchmarks/bench_nsa.py --sweep tries other tiles) and replace
allocate_like and allocate_indices through this module.

Every rule takes the architecture and the keys (block_d, group_pad, block_size) of a layout
(layout.py): the padded head size, the group size rounded up to a power of two, the block
size. A rule reads the keys it needs and ignores the others.
"""

from __future__ import annotations

import dataclasses

import torch

from gatedfwa.ops.common.hardware import streaming_multiprocessors
from gatedfwa.ops.common.triton_support import cdiv, dot_precision, next_power_of_2
from gatedfwa.ops.common.tuning import Tuning, architecture
from gatedfwa.ops.nsa.layout import SequenceLayout

__all__ = ["TUNING", "kernel_config", "kernel_flags", "query_splits", "queries_per_item", "allocate_like",
           "allocate_indices"]


def kernel_flags(layout, q: torch.Tensor) -> dict:
    """The compile-time arguments every NSA kernel takes from the layout (layout.py)."""
    return dict(GROUP=layout.group, GROUP_PAD=layout.group_pad, HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d,
                VARLEN=layout.varlen, DOT_PRECISION=dot_precision(q.dtype))


# The kernels' tiles. ROWS (query, head) rows per program or step is a power of two and at
# least one group (GROUP_PAD rows: the rows of a query tile are whole groups, layout.py);
# BLOCK_C summaries and BLOCK_K keys per tile are powers of two of at least 16 (tensor-core
# products). Under the interpreter the tiles are small, so that the tests' short sequences
# span several of them.


def _compressed_rule(arch: str, block_d: int, group_pad: int, block_size: int) -> dict:
    """The compressed branch (forward, dq, dk/dv): ROWS query rows per program, BLOCK_C
    summaries per tile."""
    if arch == "interpreter":
        return dict(ROWS=max(64, group_pad), BLOCK_C=16, num_warps=4, num_stages=1)
    rows = max(64 if block_d <= 128 else 32, group_pad)
    return dict(ROWS=rows, BLOCK_C=64 if block_d <= 128 else 32, num_warps=4, num_stages=2)


def _selection_rule(arch: str, block_d: int, group_pad: int, block_size: int) -> dict:
    """The block selection: ROWS query rows per program, BLOCK_C summaries per tile."""
    if arch == "interpreter":
        return dict(ROWS=max(64, group_pad), BLOCK_C=16, num_warps=4, num_stages=1)
    if block_d <= 128:
        # Chosen by `bench_nsa.py --sweep` on an H200 (benchmarks/results/nsa_sweep.md): at
        # D=128 smaller summary tiles with a deeper pipeline beat BLOCK_C=64 with 4 warps at
        # groups 1 and 16 (0.57 vs 0.88 ms and 0.27 vs 0.38 ms, T=8192).
        return dict(ROWS=max(16, group_pad), BLOCK_C=32, num_warps=2, num_stages=3)
    return dict(ROWS=max(16, group_pad), BLOCK_C=32, num_warps=4, num_stages=2)


def _selected_rule(arch: str, block_d: int, group_pad: int, block_size: int) -> dict:
    """The query-major selected forward and dq, and the block-major backward (dk/dv, and dq
    where block-major): ROWS query rows per program (per step of a work item's walk), BLOCK_K
    keys per tile (a block is one or more tiles)."""
    if arch == "interpreter":  # 16-key tiles, so that a block larger than 16 keys takes several
        return dict(ROWS=max(64, group_pad), BLOCK_K=16, num_warps=4, num_stages=1)
    block_k = max(16, min(64, next_power_of_2(block_size)))
    return dict(ROWS=max(16, group_pad), BLOCK_K=block_k, num_warps=4, num_stages=2)


def _block_major_rule(arch: str, block_d: int, group_pad: int, block_size: int) -> dict:
    """The block-major selected forward: ROWS (query, head) rows per step of a work item's
    walk, BLOCK_K keys per program."""
    if arch == "interpreter":  # 16-key tiles, so that a block larger than 16 keys takes several
        return dict(ROWS=max(16, group_pad), BLOCK_K=16, num_warps=4, num_stages=1)
    block_k = max(16, min(64, next_power_of_2(block_size)))
    return dict(ROWS=max(64, group_pad), BLOCK_K=block_k, num_warps=4, num_stages=2)


def _query_splits_rule(arch: str, block_d: int, group_pad: int, block_size: int) -> dict:
    """How the summaries' backward (compressed.py, dk/dv) cuts a sequence's queries into spans
    (query_splits): spans of at least MIN_QUERY_SPAN queries (shorter spans re-read the same
    summary tile for too little work), as many as WAVES waves of programs over the GPU's SMs
    ask for, or at most MAX_SPLITS where set (the interpreter: several spans even at the
    tests' sizes)."""
    if arch == "interpreter":
        return dict(MIN_QUERY_SPAN=16, MAX_SPLITS=3, WAVES=4)
    return dict(MIN_QUERY_SPAN=256, MAX_SPLITS=None, WAVES=4)


def _work_items_rule(arch: str, block_d: int, group_pad: int, block_size: int) -> dict:
    """ROWS_PER_ITEM: (query, head) rows one block-major work item walks at most
    (selected_block_major.work_items): a block every query keeps (block 0) is cut into several
    items so that its program does not run T steps alone. Under the interpreter items of 8
    queries, so that the tests' lists are cut too."""
    if arch == "interpreter":
        return dict(ROWS_PER_ITEM=8 * group_pad)
    return dict(ROWS_PER_ITEM=4096)


@dataclasses.dataclass(frozen=True)
class NSAKnobs:
    """block_major_max_group: groups up to this size run the selected branch's forward and dq
    block-major (selected_block_major.py), larger groups query-major; 0 makes every group
    query-major. `python benchmarks/bench_nsa.py --compare-selected` times both at groups 1 and
    16: on an H200 at T=32k (benchmarks/results/nsa_selected_compare.md) block-major takes
    group 1 from 71.1 to 25.2 ms forward+backward and loses at group 16 (76.8 against 71.8 ms);
    groups 2-4 are not measured and follow group 1, whose reason (few rows per block load)
    they share. Benchmarks and tests set 0 or a large value to run one strategy everywhere."""

    block_major_max_group: int = 4


TUNING = Tuning(
    "nsa", key_names=("block_d", "group_pad", "block_size"),
    rules={"compressed": _compressed_rule, "selection": _selection_rule, "selected": _selected_rule,
           "block_major": _block_major_rule, "query_splits": _query_splits_rule, "work_items": _work_items_rule},
    knobs=NSAKnobs())


def kernel_config(kernel: str, layout: SequenceLayout) -> dict:
    """TUNING's configuration of `kernel` (a key of TUNING.rules) for this layout's head size,
    group and block size on its device's architecture."""
    return TUNING.config(kernel, architecture(layout.device), block_d=layout.block_d, group_pad=layout.group_pad,
                         block_size=layout.block_size)


def query_splits(layout: SequenceLayout, programs: int) -> tuple[int, int]:
    """(query_span, splits) for the summaries' backward: the queries of a sequence are cut into
    `splits` spans of query_span tokens, each a program of its own, so that a few summary
    tiles still fill the GPU (one tile per program would leave most SMs idle: T=8192 with 4
    kv heads has 8 tiles). About WAVES waves of programs (the tiles' work is triangular: early
    summaries are seen by more queries), spans of at least MIN_QUERY_SPAN (TUNING's
    "query_splits")."""
    tuned = kernel_config("query_splits", layout)
    longest = max(layout.max_seqlen, 1)
    wanted = tuned["MAX_SPLITS"]
    if wanted is None:
        wanted = cdiv(tuned["WAVES"] * streaming_multiprocessors(layout.device), max(programs, 1))
    splits = max(1, min(wanted, cdiv(longest, tuned["MIN_QUERY_SPAN"])))
    span = cdiv(longest, splits)
    return span, cdiv(longest, span)


def queries_per_item(layout: SequenceLayout) -> int:
    """Queries one block-major work item takes at most: TUNING's ROWS_PER_ITEM rows of
    GROUP_PAD heads each, at least one."""
    return max(1, kernel_config("work_items", layout)["ROWS_PER_ITEM"] // layout.group_pad)


def allocate_like(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised output buffer shaped like x. Tests replace this to
    fill outputs with NaN, which shows any element a kernel fails to write."""
    return torch.empty_like(x)


def allocate_indices(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uninitialised int32 index buffer. Tests replace this to fill it with a value no slot may
    keep, which shows any entry the kernel fails to write."""
    return torch.empty(shape, dtype=torch.int32, device=device)
