"""Launch configuration of the decode kernel (kernels.py): the family's tuning surface (TUNING:
the tile limits, warps, stages and programs per SM of a step, per architecture and head size)
and what one step derives from it, the tile sizes and the number of slot splits, a pure
function of the shapes and the GPU's SM count. Tests and benchmarks override a step's entries
per call (decode_attention_triton's keyword arguments) or the rule through
TUNING.overridden(...) (gatedfwa/ops/common/tuning.py)."""

from __future__ import annotations

import math

import torch

from gatedfwa.ops.common.hardware import streaming_multiprocessors
from gatedfwa.ops.common.triton_support import cdiv, next_power_of_2
from gatedfwa.ops.common.tuning import Tuning, architecture

__all__ = ["TUNING", "decode_config", "split_slots"]


def _step_rule(arch: str, block_d: int) -> dict:
    """MAX_BLOCK_M: query rows (new tokens x group) per program at most; BLOCK_N: cache slots
    per tile; PROGRAMS_PER_SM: programs a step aims at per SM when it splits the slots (beyond
    that, more splits add merge work and no streaming); num_warps, num_stages."""
    return dict(MAX_BLOCK_M=64, BLOCK_N=64 if block_d <= 128 else 32, PROGRAMS_PER_SM=4, num_warps=4, num_stages=2)


TUNING = Tuning("decode", key_names=("block_d",), rules={"step": _step_rule})


def decode_config(batch: int, num_kv_heads: int, group: int, length: int, head_dim: int, used_slots: int,
                  device: torch.device, element_size: int = 2) -> dict:
    """Tile sizes and the number of slot splits for one decode step (keys and values of
    ``element_size`` bytes, 2 for bf16/fp16)."""
    tuned = TUNING.config("step", architecture(device), block_d=max(16, next_power_of_2(head_dim)))
    rows = length * group
    block_m = min(tuned["MAX_BLOCK_M"], max(16, next_power_of_2(rows)))
    block_n = tuned["BLOCK_N"]
    row_blocks = cdiv(rows, block_m)
    programs = batch * num_kv_heads * row_blocks
    # Split the slots (flash-decoding) when the programs are too few to keep every SM
    # streaming: at batch 1 the window is all the work there is. The split count balances
    # the two reads on a (batch row, kv head, row block)'s critical path: each split streams
    # used/S slots, then the program that finishes last reads the S partial results (its rows'
    # outputs in float32) to merge them. Their sum is least for S = sqrt(slot bytes * used /
    # partial bytes): B=1, HQ=32, H=8, D=128, w=4096, bf16 gives 32 splits of 128 slots, and
    # the merge reads 64 KB per kv head against its 2 MB of keys and values. S is also capped
    # by the programs that fill the GPU and by one tile per split.
    fill = cdiv(tuned["PROGRAMS_PER_SM"] * streaming_multiprocessors(device), programs)
    slot_bytes = 2 * head_dim * element_size + group * 4  # keys, values, the group's decays
    partial_bytes = min(rows, block_m) * (head_dim + 1) * 4  # outputs and log-sum-exps
    balance = math.isqrt(used_slots * slot_bytes // partial_bytes)
    num_splits = max(1, min(fill, balance, cdiv(used_slots, block_n)))
    return dict(block_m=block_m, block_n=block_n, num_splits=num_splits, num_warps=tuned["num_warps"],
                num_stages=tuned["num_stages"])


def split_slots(used_slots: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(slots per split, splits launched) for ``num_splits`` asked: each split takes whole
    tiles of ``block_n`` slots, so fewer splits may come out; none of them is empty."""
    per_split = cdiv(cdiv(max(used_slots, 1), num_splits), block_n) * block_n
    return per_split, max(1, cdiv(used_slots, per_split))
