"""The key-tile walk of a forward or dq program, shared by both kernels.

A program that owns the query rows [m0, m0 + BLOCK_M) of one sequence and one query head
visits every key tile its rows can see, outward from the diagonal (tiles.py explains the
decay terms and the tile phases), and folds each tile into its running state with a tile
function: _forward_tile (forward.py) into the softmax accumulators, _dq_tile (backward.py)
into dq and the row sums of dS. The walk owns everything the two have in common: which tiles,
in which order, with which masks, and the gate's row and key terms of each tile together with
the loads that fetch them. Those loads sit where they do for speed (see the comments below);
keeping them in one place keeps the two kernels' tuning from drifting apart.

The tile function is passed in as a compile-time argument, and the two kernels' differing
state travels as tuples, so the walk compiles to the same machine code as a walk written out
inside each kernel (benchmarks/kernel_instructions.py reads that code).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gatedfwa.ops.window_attention.tiles import (
    NO_DECAY, PAIR_DECAY, SPLIT_DECAY, suffix_sums_left_of, tile_prefix,
)

__all__ = ["walk_key_tiles"]


@triton.jit
def walk_key_tiles(
    tile, state, rows, k_head, v_head, p_head, s_head, query_offset,
    offs_m, offs_d, m0, bos, eos, window, stride_kt, stride_vt, qk_scale,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATE_CHUNK: tl.constexpr, HAS_GATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    """Fold every key tile that the query rows offs_m [BLOCK_M] (starting at m0) can see into
    state, and return it.

    tile: a jitted function
        tile(state, rows, k_head, v_head, row_shift, key_term, offs_m, offs_n, offs_d, bos, eos,
             window, stride_kt, stride_vt, qk_scale, HEAD_DIM, EVEN_D, MASKED, DECAY,
             DOT_PRECISION, USE_TMA) -> state
    that folds the keys offs_n [BLOCK_N] in: MASKED says whether some pair of the tile lies
    outside the window or the sequence, DECAY how the gate's decay is applied (tiles.py), with
    the row term row_shift [BLOCK_M] and the key term key_term [BLOCK_N].
    state: a tuple of the tensors the tile function carries from tile to tile.
    rows: a tuple of per-program inputs the tile function reads (q, and what else it needs).
    query_offset [BLOCK_M]: L_t of the rows (tiles.py), zeros without gate.
    USE_TMA: k_head and v_head are tensor descriptors of the sequence (sequence_descriptor);
    the tile function then gets (descriptor, first key - bos) pairs and its USE_TMA set.
    """
    DIAGONAL: tl.constexpr = PAIR_DECAY if HAS_GATE else NO_DECAY
    key_term = tl.zeros([BLOCK_N], dtype=tl.float32)

    # Phase 1: the diagonal tiles [m0, m0 + BLOCK_M), left to right. L_j = g[m0] + ... + g[j].
    # The first tile's sums are read here, before the loop: read at the top of the loop, they
    # would be staged through shared memory by the loop's pipelining for a single use (3% of
    # the forward at w = 512, H200). Further tiles (BLOCK_M > BLOCK_N) read theirs after the
    # previous tile, as in phase 2.
    diagonal_end = tl.minimum(m0 + BLOCK_M, eos)
    running = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
    prefix = key_term
    tile_sum = running
    if HAS_GATE:
        prefix, tile_sum = tile_prefix(p_head, m0 + tl.arange(0, BLOCK_N), m0, eos, True, BLOCK_N, GATE_CHUNK, True)
    for n0 in range(m0, diagonal_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HAS_GATE:
            key_term = -(running + prefix)
            running += tile_sum
        keys, values = _tile_sources(k_head, v_head, n0 - bos, USE_TMA)
        state = tile(state, rows, keys, values, query_offset, key_term,
                     offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
                     HEAD_DIM, EVEN_D, True, DIAGONAL, DOT_PRECISION, USE_TMA)
        if HAS_GATE:
            if BLOCK_M > BLOCK_N:
                prefix, tile_sum = tile_prefix(p_head, offs_n + BLOCK_N, n0 + BLOCK_N, eos,
                                                n0 + BLOCK_N < diagonal_end, BLOCK_N, GATE_CHUNK, True)

    # Phase 2: tiles left of the diagonal, nearest first. For key tile [n0, n0 + BLOCK_N):
    # L_j = -(g[j+1] + ... + g[m0-1]) = running - S_tile[j], with running = -(gates in
    # [n0 + BLOCK_N, m0)), so L_t - L_j = (L_t - running) + S_tile[j]: a row term and the
    # suffix sums as loaded. Tiles whose keys are all >= bos and inside every row's window
    # need no mask.
    lowest_key = tl.maximum(bos, m0 - window + 1)
    num_tiles = tl.cdiv(m0 - lowest_key, BLOCK_N)
    unmasked_floor = tl.maximum(bos, m0 + BLOCK_M - window)
    num_unmasked = tl.minimum(tl.maximum(m0 - unmasked_floor, 0) // BLOCK_N, num_tiles)
    running = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
    # Each tile loads the next tile's sums right after its own logits have used its sums:
    # their latency hides behind the rest of the tile and the next tile's q k^T, and the old
    # and new values are never live at once, so the loop carries them without register copies
    # (16 moves per tile when the load came first; kernel_instructions.py). The masked loop,
    # which holds the program's last tile, skips the load after it: a program would otherwise
    # end waiting on a load it never uses (2-3% of the forward at w = 512, H200). The unmasked
    # loop is followed by a masked tile except where the window reaches the sequence start, so
    # it skips no load and needs no predicate (its unused load stays in bounds: the address is
    # clamped to the sequence start). The first load is masked at the sequence end: in a
    # sequence's first block (m0 = bos) the phase has no tiles and a sequence shorter than a
    # tile ends inside [bos, bos + BLOCK_N). The unmasked tiles come first, then the masked
    # ones, each run a loop of its own (_tiles_left_of_diagonal) so that the unmasked loop
    # compiles without any mask.
    tile_sum = running
    if HAS_GATE:
        key_term, tile_sum = suffix_sums_left_of(p_head, s_head, m0, bos, eos, m0 > lowest_key, BLOCK_N,
                                                  GATE_CHUNK, True)
    state, running, key_term, tile_sum = _tiles_left_of_diagonal(
        tile, state, rows, 0, num_unmasked, running, key_term, tile_sum, k_head, v_head, p_head, s_head,
        query_offset, offs_m, offs_d, m0, bos, eos, lowest_key, window, stride_kt, stride_vt, qk_scale,
        HEAD_DIM, EVEN_D, BLOCK_N, GATE_CHUNK, HAS_GATE, DOT_PRECISION, False, USE_TMA)
    state, running, key_term, tile_sum = _tiles_left_of_diagonal(
        tile, state, rows, num_unmasked, num_tiles, running, key_term, tile_sum, k_head, v_head, p_head,
        s_head, query_offset, offs_m, offs_d, m0, bos, eos, lowest_key, window, stride_kt, stride_vt,
        qk_scale, HEAD_DIM, EVEN_D, BLOCK_N, GATE_CHUNK, HAS_GATE, DOT_PRECISION, True, USE_TMA)
    return state


@triton.jit
def _tiles_left_of_diagonal(
    tile, state, rows, first, last, running, key_term, tile_sum, k_head, v_head, p_head, s_head,
    query_offset, offs_m, offs_d, m0, bos, eos, lowest_key, window, stride_kt, stride_vt, qk_scale,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, GATE_CHUNK: tl.constexpr,
    HAS_GATE: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    """Phase 2 of walk_key_tiles for the tiles [first, last) counted leftwards from m0, all
    MASKED or none: folds them into state and returns it with the gate terms carried on
    (running, and key_term, tile_sum of the tile after them)."""
    OFF_DIAGONAL: tl.constexpr = SPLIT_DECAY if HAS_GATE else NO_DECAY
    row_shift = query_offset
    for i in range(first, last):
        n0 = m0 - (i + 1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if HAS_GATE:
            row_shift = query_offset - running
            running -= tile_sum
        keys, values = _tile_sources(k_head, v_head, n0 - bos, USE_TMA)
        state = tile(state, rows, keys, values, row_shift, key_term,
                     offs_m, offs_n, offs_d, bos, eos, window, stride_kt, stride_vt, qk_scale,
                     HEAD_DIM, EVEN_D, MASKED, OFF_DIAGONAL, DOT_PRECISION, USE_TMA)
        if HAS_GATE:
            # The next tile's sums: walk_key_tiles says why here, and why only the masked
            # tiles, which hold the program's last one, skip the load past the last tile.
            live = n0 > lowest_key if MASKED else True
            key_term, tile_sum = suffix_sums_left_of(p_head, s_head, n0, bos, eos, live, BLOCK_N, GATE_CHUNK,
                                                      False)
    return state, running, key_term, tile_sum


@triton.jit
def _tile_sources(k_head, v_head, start, USE_TMA: tl.constexpr):
    """What a tile function loads its keys and values from: the head pointers, or with USE_TMA
    (descriptor, tile start relative to the sequence start) pairs."""
    if USE_TMA:
        return (k_head, start), (v_head, start)
    else:
        return k_head, v_head
