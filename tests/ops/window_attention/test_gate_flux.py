"""The gate gradient from chunk-boundary fluxes (gatedfwa/ops/window_attention/gate_flux.py):
the flux identity on random score gradients, the dq kernel's per-tile dS totals against a
float64 dS, and dg against the plain reverse sum."""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.window_attention import backward as triton_backward
from gatedfwa.ops.window_attention import launch
from gatedfwa.ops.window_attention.gate_flux import flux_tile_count, gate_gradient_from_flux
from gatedfwa.ops.window_attention.naive import boundary_fluxes, naive_gate_gradient_from_flux


def banded_score_gradients(seqlen: int, window: int, bounds, dtype=torch.float64) -> torch.Tensor:
    """Random dS [T, T]: nonzero only for pairs j <= t < j + window inside one sequence."""
    t = torch.arange(seqlen)[:, None]
    j = torch.arange(seqlen)[None, :]
    same = torch.zeros(seqlen, seqlen, dtype=torch.bool)
    for start, stop in bounds:
        same[start:stop, start:stop] = True
    return torch.randn(seqlen, seqlen, dtype=dtype) * ((j <= t) & (t - j < window) & same)


def tile_totals(ds: torch.Tensor, bounds, window: int, block_m: int, block_n: int) -> torch.Tensor:
    """What the dq kernel stores: for each sequence and query block, the dS total of each key
    tile left of the block's first row, nearest first -> [S, 1, NB, NT] float32."""
    num_blocks = max(-(-(stop - start) // block_m) for start, stop in bounds)
    num_tiles = flux_tile_count(window, block_m, block_n)
    flux = torch.zeros(len(bounds), 1, num_blocks, num_tiles, dtype=torch.float64)
    for s, (start, stop) in enumerate(bounds):
        for b in range(-(-(stop - start) // block_m)):
            m0 = start + b * block_m
            rows = slice(m0, min(m0 + block_m, stop))
            for i in range(num_tiles):
                n0 = m0 - (i + 1) * block_n
                flux[s, 0, b, i] = ds[rows, max(n0, start):max(n0 + block_n, start)].sum()
    return flux.float()


CASES = [  # seqlen, window, block_m, block_n, sequences (None: one)
    (100, 20, 16, 8, None),
    (100, 7, 16, 16, None),
    (130, 33, 32, 8, [0, 40, 41, 41, 130]),
    (64, 1, 16, 8, None),
]


def split_in_parts(flux: torch.Tensor, parts: int) -> torch.Tensor:
    """Each tile total of flux [..., NT] as `parts` random pieces that sum to it, laid out as the
    dq kernel stores them per warp: [..., NT * parts]."""
    weights = torch.rand(*flux.shape, parts, dtype=torch.float64)
    pieces = flux.double()[..., None] * (weights / weights.sum(-1, keepdim=True))
    return pieces.flatten(-2).float()


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("seqlen, window, block_m, block_n, cu_seqlens", CASES)
def test_flux_identity(seqlen, window, block_m, block_n, cu_seqlens, parts, device):
    """F(c) = sum of dS_tj over j < c <= t equals sum_{t >= c} dU_t at every block start c,
    and dg from the fluxes equals the float64 reverse sum of dU (to float32 rounding); the
    same with each tile's total stored in parts."""
    bounds = [(0, seqlen)] if cu_seqlens is None else list(zip(cu_seqlens[:-1], cu_seqlens[1:]))
    ds = banded_score_gradients(seqlen, window, bounds)
    du = ds.sum(1) - ds.sum(0)  # row sums - column sums
    flux = split_in_parts(tile_totals(ds, bounds, window, block_m, block_n), parts)
    fluxes = boundary_fluxes(flux, block_m, block_n, parts)[:, 0]
    expected = torch.zeros(seqlen, dtype=torch.float64)
    for s, (start, stop) in enumerate(bounds):
        for k in range(fluxes.shape[-1]):
            c = start + k * block_m
            crossing = ds[c:stop, start:c].sum() if c < stop else torch.tensor(0.0, dtype=torch.float64)
            torch.testing.assert_close(fluxes[s, k], crossing, atol=1e-5, rtol=1e-6)
            if c < stop:
                torch.testing.assert_close(crossing, du[c:stop].sum(), atol=1e-9, rtol=1e-9)
        expected[start:stop] = du[start:stop].flip(0).cumsum(0).flip(0)
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    for assemble in (naive_gate_gradient_from_flux, gate_gradient_from_flux):  # PyTorch, Triton kernel
        dg = assemble(du.float()[None, None].to(device), flux.to(device), offsets, block_m, block_n, parts)
        assert dg.dtype == torch.float32 and dg.shape == (1, 1, seqlen)
        torch.testing.assert_close(dg[0, 0].double().cpu(), expected, atol=2e-5, rtol=1e-5)


def test_flux_tile_count_falls_back_for_long_windows():
    assert flux_tile_count(1, 64, 32) == 1
    assert flux_tile_count(1024, 64, 32) == 32
    limit = launch.TUNING.knobs.max_flux_tiles_per_block_m * 64
    assert flux_tile_count(limit * 32 + 1, 64, 32) == limit
    assert flux_tile_count(limit * 32 + 2, 64, 32) == 0


def reference_score_gradients(q, k, v, g, do, window, scale, start, stop):
    """float64 dS [HQ, T, T] of one sequence [start, stop) (B == 1, HQ == H)."""
    q, k, v, do = (x[0, start:stop].double().transpose(0, 1) for x in (q, k, v, do))
    cum = g[0, start:stop].double().cumsum(0).t()  # [H, T]
    n = stop - start
    t, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = (j <= t) & (t - j < window)
    s = scale * q @ k.transpose(-1, -2) + cum[:, :, None] - cum[:, None, :]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    dp = do @ v.transpose(-1, -2)
    return p * (dp - (p * dp).sum(-1, keepdim=True))


def backward_with_captured_flux(monkeypatch, q, k, v, g, do, window, offsets):
    """The Triton forward and backward with gate sums, capturing the flux buffer on its way to
    gate_gradient_from_flux. Returns (dg, dU, the tile totals [S, HQ, NB, NT] with the kernel's
    parts summed, (block_m, block_n), parts)."""
    from gatedfwa.ops.window_attention.chunk_sums import chunk_gate_sums
    from gatedfwa.ops.window_attention.forward import attention_forward

    captured = {}

    def capture(du, flux, cu, block_m, block_n, parts=1):
        captured.update(du=du.clone(), flux=flux.clone(), blocks=(block_m, block_n), parts=parts)
        return gate_gradient_from_flux(du, flux, cu, block_m, block_n, parts=parts)

    monkeypatch.setattr(triton_backward, "gate_gradient_from_flux", capture)
    head_dim, scale = q.shape[-1], q.shape[-1]**-0.5
    sums = chunk_gate_sums(g, launch.gate_chunk(head_dim, q.device), offsets)
    o, lse = attention_forward(q, k, v, sums, window, scale, offsets)
    dg = triton_backward.attention_backward(do, q, k, v, sums, o, lse, window, scale, offsets)[3]
    flux, parts = captured["flux"], captured["parts"]
    totals = flux.view(*flux.shape[:-1], -1, parts).sum(-1)
    return dg, captured["du"], totals, captured["blocks"], parts


@pytest.mark.parametrize("cu_seqlens", [None, [0, 37, 37, 90]], ids=["one", "varlen"])
def test_dq_kernel_stores_tile_totals(triton_backend, monkeypatch, cu_seqlens, device):
    """The dq kernel's flux buffer (captured on its way to gate_gradient_from_flux) against
    the tile totals of a float64 dS, and dg against the plain reverse sum of dU. On a GPU
    (GATEDFWA_TEST_DEVICE=cuda) at a size with several of its larger tiles per window; the
    totals are checked as the sums of their parts where the kernel stores them in parts."""
    seqlen, heads, head_dim, window = (90, 2, 16, 23) if device == "cpu" else (700, 2, 64, 300)
    if cu_seqlens is not None and device != "cpu":
        cu_seqlens = [0, 290, 290, 700]
    q, k, v, do = (torch.randn(1, seqlen, heads, head_dim, device=device) for _ in range(4))
    g = -0.1 * torch.rand(1, seqlen, heads, device=device)
    scale = head_dim**-0.5
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    bounds = [(0, seqlen)] if cu_seqlens is None else list(zip(cu_seqlens[:-1], cu_seqlens[1:]))
    dg, du, totals, (block_m, block_n), _ = backward_with_captured_flux(monkeypatch, q, k, v, g, do, window, offsets)
    q, k, v, g, do = (x.cpu() for x in (q, k, v, g, do))
    for h in range(heads):
        ds = torch.zeros(seqlen, seqlen, dtype=torch.float64)
        for start, stop in bounds:
            if stop > start:
                ds[start:stop, start:stop] = reference_score_gradients(q, k, v, g, do, window, scale, start, stop)[h]
        expected = tile_totals(ds, bounds, window, block_m, block_n)[:, 0]
        torch.testing.assert_close(totals[:, h].cpu(), expected, atol=1e-4, rtol=1e-4)
    plain = triton_backward._reverse_cumsum_within_sequences(du, offsets)
    torch.testing.assert_close(dg, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled dq kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("head_dim, window", [(64, 330), (128, 700)])
def test_warp_flux_totals_match_one_sum_per_tile(triton_backend, monkeypatch, dtype, head_dim, window):
    """The dq kernel's flux tile totals stored one part per warp (inline PTX, no shared memory)
    against the same kernel's one tl.sum per tile, on the same inputs: equal to float32
    rounding, and dg with them. The per-warp store must be what runs for 16-bit inputs on
    Hopper, and must not run for float32 (its products leave the tensor cores' layout)."""
    seqlen, heads = 1100, 2
    cu_seqlens = torch.tensor([0, 500, 500, 1100], dtype=torch.int32, device="cuda")
    q, k, v, do = (torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=dtype) for _ in range(4))
    g = -0.1 * torch.rand(1, seqlen, heads, device="cuda")
    runs = {}
    for warp_totals in (True, False):
        with launch.TUNING.overridden(warp_flux_totals=warp_totals):
            dg, _, totals, _, parts = backward_with_captured_flux(monkeypatch, q, k, v, g, do, window, cu_seqlens)
        runs[warp_totals] = (totals, dg, parts)
    hopper = torch.cuda.get_device_capability()[0] == 9 and torch.version.hip is None
    expected_parts = launch.kernel_config("dq", head_dim, True, q.device)["BLOCK_M"] // 16 if hopper and dtype != torch.float32 else 1
    assert runs[True][2] == expected_parts and runs[False][2] == 1
    totals, dg, _ = runs[True]
    reference_totals, reference_dg, _ = runs[False]
    size = reference_totals.abs().max().item()
    torch.testing.assert_close(totals, reference_totals, rtol=1e-5, atol=1e-5 * size)
    torch.testing.assert_close(dg, reference_dg, rtol=1e-5, atol=1e-5 * reference_dg.abs().max().item())


def test_flux_error_does_not_grow_along_a_long_sequence():
    """T = 2^18, w = 8, dS stored as its band: float32 row and column sums of dS (different
    summation orders, as in the dq and dk/dv kernels) and float32 tile totals, then dg two
    ways against float64. The plain reverse sum of dU carries the rounding mismatch of all
    later positions (its error at the start grows like sqrt(T)); from the fluxes the error
    over the first 256 positions stays within 2x that over the last 256."""
    seqlen, window, block_m, block_n = 2**18, 8, 16, 8
    torch.manual_seed(0)
    band = torch.randn(seqlen, window, dtype=torch.float64)  # band[t, d] = dS_{t, t - d}
    band[torch.arange(seqlen)[:, None] < torch.arange(window)[None, :]] = 0.0
    t = torch.arange(seqlen)[:, None]
    keys = (t - torch.arange(window)[None, :]).clamp(min=0)

    def du_of(values):
        rows = values.sum(1)
        cols = torch.zeros(seqlen, dtype=values.dtype).index_add_(0, keys.flatten(), values.flatten())
        return rows - cols

    exact = du_of(band).flip(0).cumsum(0).flip(0)
    du32 = du_of(band.float())
    # Tile totals: pair (t, t - d) lies in query block t // BM and, counted leftwards from the
    # block start m0, in key tile (m0 - 1 - (t - d)) // BN when t - d < m0.
    m0 = t // block_m * block_m
    left = keys < m0
    tile = ((m0 - 1 - keys) // block_n).clamp(min=0)
    num_tiles = flux_tile_count(window, block_m, block_n)
    flat = ((t // block_m) * num_tiles + tile)[left]
    flux = torch.zeros(seqlen // block_m * num_tiles, dtype=torch.float32)
    flux.index_add_(0, flat, band.float()[left])
    flux = flux.view(1, 1, seqlen // block_m, num_tiles)

    # The PyTorch assembly (the kernel sums the same terms: test_flux_identity compares them).
    from_flux = naive_gate_gradient_from_flux(du32[None, None], flux, None, block_m, block_n)[0, 0].double()
    plain = du32.double().flip(0).cumsum(0).flip(0)

    def head_and_tail(dg):
        err = (dg - exact).abs()
        return err[:256].max().item(), err[-256:].max().item()

    head, tail = head_and_tail(from_flux)
    assert head <= 2 * tail, (head, tail)
    plain_head, plain_tail = head_and_tail(plain)
    assert plain_head > 5 * plain_tail, (plain_head, plain_tail)  # the drift this removes


@pytest.mark.parametrize("cu_seqlens", [None, [0, 50, 50, 51, 120]], ids=["batch", "varlen"])
def test_kernel_matches_reference_assembly(cu_seqlens, device):
    """The Triton assembly against the PyTorch one on random dU and tile totals: several
    batch rows and heads, or packed sequences (empty, one token, ragged last block)."""
    seqlen, heads, block_m, block_n, tiles = 120, 3, 16, 8, 5
    batch = 2 if cu_seqlens is None else 1
    sequences = batch if cu_seqlens is None else len(cu_seqlens) - 1
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    longest = seqlen if cu_seqlens is None else max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    blocks = -(-longest // block_m)
    du = torch.randn(batch, heads, seqlen, device=device)
    flux = torch.randn(sequences, heads, blocks, tiles, device=device)
    if cu_seqlens is not None:  # blocks past a sequence's end stay zero, as the dq kernel leaves them
        for s, (start, stop) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
            flux[s, :, -(-(stop - start) // block_m):] = 0.0
    expected = naive_gate_gradient_from_flux(du, flux, offsets, block_m, block_n)
    torch.testing.assert_close(gate_gradient_from_flux(du, flux, offsets, block_m, block_n), expected,
                               atol=1e-5, rtol=1e-6)
