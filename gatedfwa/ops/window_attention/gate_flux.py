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
[m0 - (i + 1) BLOCK_N, m0 - i BLOCK_N). Its pairs cross every boundary c = m0 - d BLOCK_M with
i >= d BLOCK_M / BLOCK_N, so

    F(bos + k BLOCK_M) = sum_{d >= 0} sum_{i >= d r} flux[k + d, i],   r = BLOCK_M / BLOCK_N,

at most window / BLOCK_M + 1 blocks of at most window / BLOCK_N tiles. The in-chunk sums of dU
are differences of one float64 reverse cumulative sum of the stored float32 dU (exact in
float64 to far below float32's rounding: the values are summed, not recomputed).
"""

from __future__ import annotations

import torch

__all__ = ["boundary_fluxes", "gate_gradient_from_flux", "flux_tile_count"]

# The flux buffer holds flux_tile_count(...) float32 values per query block; beyond this many
# (windows over about 4 BLOCK_M tiles of keys per block) the backward keeps the plain reverse sum.
MAX_FLUX_TILES_PER_BLOCK_M = 4


def flux_tile_count(window: int, block_m: int, block_n: int) -> int:
    """Key tiles left of the diagonal a dq program visits at most (0: the flux is not used,
    the window being too long for a buffer of at most MAX_FLUX_TILES_PER_BLOCK_M * BLOCK_M
    values per query block)."""
    tiles = max(1, -(-(window - 1) // block_n))
    return tiles if tiles <= MAX_FLUX_TILES_PER_BLOCK_M * block_m else 0


def boundary_fluxes(flux: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """flux [S, HQ, NB, NT] float32 (dS totals per query block and key tile, as the dq kernel
    stores them) -> F [S, HQ, NB + 1] float64, F[..., k] = the sum of dS_tj over the pairs j < c
    <= t for c = bos + k BLOCK_M of each sequence (F[..., NB] = 0: no query follows)."""
    num_blocks, num_tiles = flux.shape[-2:]
    ratio = block_m // block_n
    # beyond[..., b, i] = flux[..., b, i] + flux[..., b, i + 1] + ...: the tiles of block b
    # whose keys lie left of key tile i's right edge.
    beyond = flux.double().flip(-1).cumsum(-1).flip(-1)
    # F[k] = sum over distances d of beyond[k + d, d r]: one gather of [NB + 1, distances]
    # entries from beyond padded with zero blocks (past the last block, and k = NB).
    distances = -(-num_tiles // ratio)
    beyond = torch.nn.functional.pad(beyond, (0, 0, 0, distances + 1))
    d = torch.arange(distances, device=flux.device)
    blocks = torch.arange(num_blocks + 1, device=flux.device)[:, None] + d
    return beyond[..., blocks, d * ratio].sum(-1)


def gate_gradient_from_flux(du: torch.Tensor, flux: torch.Tensor, cu_seqlens: torch.Tensor | None,
                            block_m: int, block_n: int) -> torch.Tensor:
    """dg [B, HQ, T] float32 from dU [B, HQ, T] float32 (row minus column sums of dS) and the
    dq kernel's flux [S, HQ, NB, NT] (S = B, or the number of sequences with cu_seqlens, B = 1):
    dg_s = (dU_s + ... + dU_{c-1}) + F(c), c the next block start of s's sequence (or its end)."""
    batch, num_heads, seqlen = du.shape
    fluxes = boundary_fluxes(flux, block_m, block_n)  # [S, HQ, NB + 1]
    # suffix[..., p] = dU_p + ... + dU_{T-1} in float64, suffix[..., T] = 0.
    suffix = torch.zeros((batch, num_heads, seqlen + 1), dtype=torch.float64, device=du.device)
    suffix[..., :seqlen] = du.double().flip(-1).cumsum(-1).flip(-1)
    positions = torch.arange(seqlen, device=du.device)
    if cu_seqlens is None:
        block = positions // block_m
        chunk_end = torch.clamp((block + 1) * block_m, max=seqlen)
        crossing = fluxes[..., block + 1]  # [B, HQ, T]
    else:
        bounds = cu_seqlens.long()
        seq = torch.bucketize(positions, bounds[1:], right=True)
        start, end = bounds[seq], bounds[seq + 1]
        block = (positions - start) // block_m
        chunk_end = torch.minimum(start + (block + 1) * block_m, end)
        crossing = fluxes[seq, :, block + 1].t()[None]  # [1, HQ, T]
    within = suffix[..., :seqlen] - suffix[..., chunk_end]
    return (within + crossing).float()
