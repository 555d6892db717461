"""The gate gradient from chunk-boundary fluxes: every term spans at most one window.

With dS_tj the attention's score gradients (docs/math.md, "Gradients"),

    dg_s = sum_{t >= s} dU_t,   dU_t = sum_j dS_tj - sum_i dS_it   (row sum - column sum)

and for a boundary c, sum_{t >= c} dU_t = F(c) = sum of dS_tj over the pairs j < c <= t (the
pairs whose window crosses c; every other pair is counted once as a row and once as a
column and cancels). So with c the first boundary after s,

    dg_s = (dU_s + ... + dU_{c-1}) + F(c).

Summing dU over the whole sequence instead (the identity's left side) adds up the rounding
differences between the float32 row and column sums of dS, which cancel in exact arithmetic
only: at T = 2^20 the error near the start grew to 5-30x that near the end. Here nothing is
summed over more than a window.

The boundaries are the dq kernel's query block starts, bos + k BLOCK_M in each sequence. A dq
program (block b, rows [m0, m0 + BLOCK_M)) stores the dS total of each key tile left of its
diagonal, nearest first: flux [sequences, HQ, blocks, tiles], tile i holding the keys
[m0 - (i + 1) BLOCK_N, m0 - i BLOCK_N). (On GPUs it stores each tile's total in `parts`
pieces, one per warp, [sequences, HQ, blocks, tiles * parts]; every function here takes
`parts` and reads them as finer tiles.) Its pairs cross every boundary c = m0 - d BLOCK_M with
i >= d BLOCK_M / BLOCK_N, so

    F(bos + k BLOCK_M) = sum_{d >= 0} sum_{i >= d r} flux[k + d, i],   r = BLOCK_M / BLOCK_N,

at most window / BLOCK_M + 1 blocks of at most window / BLOCK_N tiles.

gate_gradient_from_flux runs this as one Triton kernel (a program per query block: the
block's in-chunk reverse sums of dU and the flux at its end, both in float64);
naive.py's naive_gate_gradient_from_flux is the same in PyTorch, where the in-chunk sums are
differences of one float64 reverse cumulative sum of the stored float32 dU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatedfwa.ops.common.head_major import head_row
from gatedfwa.ops.common.triton_support import cdiv, next_power_of_2
from gatedfwa.ops.common.varlen import sequence_bounds
from gatedfwa.ops.window_attention import launch

__all__ = ["flux_tile_count", "gate_gradient_from_flux"]

def flux_tile_count(window: int, block_m: int, block_n: int) -> int:
    """Key tiles left of the diagonal a dq program visits at most (0: the flux is not used,
    the window being too long for a buffer of at most launch.TUNING.knobs.max_flux_tiles_per_block_m
    * BLOCK_M values per query block)."""
    tiles = max(1, -(-(window - 1) // block_n))
    return tiles if tiles <= launch.TUNING.knobs.max_flux_tiles_per_block_m * block_m else 0


@triton.jit
def _gate_gradient_kernel(
    DU, FLUX, DG, CU_SEQLENS, seqlen, num_heads, num_blocks, flux_tiles, distances,
    BLOCK_M: tl.constexpr, RATIO: tl.constexpr, TILES: tl.constexpr, VARLEN: tl.constexpr,
):
    """One program: dg of the query block [m0, m0 + BLOCK_M) of one sequence and head (the dq
    kernel's blocks): the block's reverse sums of dU plus F at the next block start, the
    flux totals of blocks block + 1 + d from tile d RATIO on, all in float64."""
    block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    bos, eos = sequence_bounds(CU_SEQLENS, seq, seqlen, VARLEN)
    m0 = bos + block * BLOCK_M
    if m0 >= eos:
        return
    if VARLEN:
        row = head * seqlen
    else:
        row = head_row(seq, head, num_heads) * seqlen - bos
    offs = m0 + tl.arange(0, BLOCK_M)
    inside = offs < eos
    du = tl.load(DU + row + offs, mask=inside, other=0.0).to(tl.float64)
    tiles = tl.arange(0, TILES)
    # Blocks past the sequence's end were never written: their totals are the buffer's zeros.
    flux_head = FLUX + head_row(seq, head, num_heads) * num_blocks * flux_tiles
    crossing = tl.zeros([TILES], dtype=tl.float64)
    for d in range(0, distances):
        source = block + 1 + d
        take = (tiles >= d * RATIO) & (tiles < flux_tiles) & (source < num_blocks)
        crossing += tl.load(flux_head + source * flux_tiles + tiles, mask=take, other=0.0).to(tl.float64)
    dg = tl.cumsum(du, 0, reverse=True) + tl.sum(crossing, 0)
    tl.store(DG + row + offs, dg.to(tl.float32), mask=inside)


def gate_gradient_from_flux(du: torch.Tensor, flux: torch.Tensor, cu_seqlens: torch.Tensor | None,
                            block_m: int, block_n: int, parts: int = 1) -> torch.Tensor:
    """As naive.naive_gate_gradient_from_flux, in one Triton launch: dU [B, HQ, T] float32 and
    flux [S, HQ, NB, NT * parts] float32 -> dg [B, HQ, T] float32."""
    batch, num_heads, seqlen = du.shape
    num_seqs, _, num_blocks, num_tiles = flux.shape
    dg = launch.allocate_like(du)
    if seqlen == 0 or num_seqs == 0:
        return dg
    ratio = block_m // block_n * parts  # entries per query block (see naive.boundary_fluxes)
    _gate_gradient_kernel[(num_blocks, num_seqs, num_heads)](
        du, flux, dg, du if cu_seqlens is None else cu_seqlens, seqlen, num_heads, num_blocks, num_tiles,
        cdiv(num_tiles, ratio), BLOCK_M=block_m, RATIO=ratio, TILES=next_power_of_2(num_tiles),
        VARLEN=cu_seqlens is not None,
        num_warps=launch.program_config("flux_gradient", du.device)["num_warps"],
    )
    return dg
