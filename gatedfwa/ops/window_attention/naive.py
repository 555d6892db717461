"""The float64 oracles of gated window attention, for tests: the op itself, and the two
intermediate results its kernels hand each other (the chunk-local gate sums, and the gate
gradient assembled from chunk-boundary fluxes). Production code never calls them.

* :func:`naive_gated_window_attention` builds the full T x T score matrix. It is the float64
  reference of every attention test, and run in a lower precision it measures how much error
  that precision alone causes (the rule of docs/correctness.md).
* :func:`naive_chunk_gate_sums`: the sums of chunk_sums.py from their definition.
* :func:`naive_gate_gradient_from_flux`, :func:`boundary_fluxes`: gate_flux.py's assembly of
  dg in float64 PyTorch.

The math: docs/math.md; shapes as in torch_path.py.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.triton_support import LOG2E
from gatedfwa.ops.common.varlen import query_key_spans

__all__ = ["naive_gated_window_attention", "naive_chunk_gate_sums", "boundary_fluxes", "naive_gate_gradient_from_flux"]


def naive_gated_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    window_size: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic reference. Every operation runs in q's dtype, so that running it in a low
    precision shows the error that precision causes by itself.

    Returns (o [B, T, HQ, D] in q's dtype, lse [B, HQ, T] float32). Rows without any
    visible key (impossible for w >= 1, kept for safety) give o = 0 and lse = -inf.
    """
    batch, _, num_q_heads, head_dim = q.shape
    group = num_q_heads // k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    dtype = q.dtype
    outs, lses = [], []
    for b, (q_start, q_end), (k_start, k_end) in query_key_spans(cu_seqlens_q, cu_seqlens, batch, q.shape[1], k.shape[1]):
        n = k_end - k_start
        qs = q[b, q_start:q_end].transpose(0, 1)  # [HQ, n_q, D]
        ks = k[b, k_start:k_end].transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[b, k_start:k_end].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # [HQ, n_q, n]
        t = torch.arange(n - (q_end - q_start), n, device=q.device)  # the queries' key positions
        if g is not None:
            cumulative = torch.cumsum(g[b, k_start:k_end].to(dtype).transpose(0, 1), dim=-1)  # [HQ, n]
            scores = scores + (cumulative[:, t, None] - cumulative[:, None, :])
        distance = t[:, None] - torch.arange(n, device=q.device)[None, :]
        visible = distance >= 0
        if window_size is not None:
            visible = visible & (distance < window_size)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [HQ, n]
        finite = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(finite, row_lse, 0.0)[..., None])
        probs = torch.where(finite[..., None], probs, 0.0)
        outs.append(torch.matmul(probs, vs).transpose(0, 1))  # [n_q, HQ, D]
        lses.append(row_lse.float())
    if cu_seqlens is None:
        return torch.stack(outs), torch.stack(lses)
    return torch.cat(outs, dim=0)[None], torch.cat(lses, dim=1)[None]


def naive_chunk_gate_sums(g: torch.Tensor, chunk: int, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk sums of chunk_sums.py by their definition, in float64: g [B, T, H] -> [2, B, H, T]
    float64, P (inclusive prefix) and S (exclusive suffix) inside chunks of `chunk` positions
    counted from each sequence's start, in base 2 (times log2(e)) as the kernel writes them."""
    batch, seqlen, num_heads = g.shape
    g = g.double().transpose(1, 2)  # [B, H, T]
    sums = torch.zeros((2, batch, num_heads, seqlen), dtype=torch.float64, device=g.device)
    bounds = [(0, seqlen)] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    for start, stop in bounds:
        for c0 in range(start, stop, chunk):
            c1 = min(c0 + chunk, stop)
            piece = g[..., c0:c1]
            sums[0, ..., c0:c1] = piece.cumsum(-1)
            # The suffix summed directly (not total - prefix, which cancels).
            later = torch.cat([piece[..., 1:], piece.new_zeros(*piece.shape[:-1], 1)], dim=-1)
            sums[1, ..., c0:c1] = later.flip(-1).cumsum(-1).flip(-1)
    return sums * LOG2E


def boundary_fluxes(flux: torch.Tensor, block_m: int, block_n: int, parts: int = 1) -> torch.Tensor:
    """flux [S, HQ, NB, NT * parts] float32 (dS totals per query block and key tile, as the dq
    kernel stores them, each tile's total in `parts` consecutive parts) -> F [S, HQ, NB + 1]
    float64, F[..., k] = the sum of dS_tj over the pairs j < c <= t for c = bos + k BLOCK_M of
    each sequence (F[..., NB] = 0: no query follows)."""
    num_blocks, num_tiles = flux.shape[-2:]
    # A tile's parts act as tiles of block_n / parts keys: the sums below only need each
    # entry's distance from the block start in entries.
    ratio = block_m // block_n * parts
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


def naive_gate_gradient_from_flux(du: torch.Tensor, flux: torch.Tensor, cu_seqlens: torch.Tensor | None,
                                  block_m: int, block_n: int, parts: int = 1) -> torch.Tensor:
    """dg [B, HQ, T] float32 from dU [B, HQ, T] float32 (row minus column sums of dS) and the
    dq kernel's flux [S, HQ, NB, NT * parts] (S = B, or the number of sequences with cu_seqlens,
    B = 1): dg_s = (dU_s + ... + dU_{c-1}) + F(c), c the next block start of s's sequence (or
    its end)."""
    batch, num_heads, seqlen = du.shape
    fluxes = boundary_fluxes(flux, block_m, block_n, parts)  # [S, HQ, NB + 1]
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
