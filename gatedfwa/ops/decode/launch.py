"""Launch configuration of the decode kernels (kernels.py): tile sizes and the number of
slot splits of one decode step. Tests and benchmarks override its entries per call
(decode_attention_triton's keyword arguments)."""

from __future__ import annotations

import torch

from gatedfwa.ops.common.hardware import streaming_multiprocessors
from gatedfwa.ops.common.triton_support import cdiv, next_power_of_2

__all__ = ["decode_config"]


def decode_config(batch: int, num_kv_heads: int, group: int, length: int, head_dim: int, used_slots: int,
                  device: torch.device) -> dict:
    """Tile sizes and the number of slot splits for one decode step."""
    rows = length * group
    block_m = min(64, max(16, next_power_of_2(rows)))
    block_n = 64 if head_dim <= 128 else 32
    row_blocks = cdiv(rows, block_m)
    programs = batch * num_kv_heads * row_blocks
    # Enough programs to keep every SM streaming (flash-decoding): at batch 1 the window is
    # all the work there is, so it is cut into splits of as little as 2 tiles (B=1, H=8,
    # w=4096: 32 splits, 256 programs); the combine then reads 32 partial rows per output
    # row, about 6% of the bytes the splits read.
    wanted = cdiv(4 * streaming_multiprocessors(device), programs)
    num_splits = max(1, min(wanted, cdiv(used_slots, 2 * block_n)))
    return dict(block_m=block_m, block_n=block_n, num_splits=num_splits, num_warps=4, num_stages=2)
