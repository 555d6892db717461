"""Triton kernels of the gate: the log gates from (a, beta_pre) and their backward, on 2-D
views [rows, H] with unit stride along H, and their launchers. The formula's device
functions are in device_math.py; the op and its autograd are in op.py."""

from __future__ import annotations

import torch

from gatedfwa.ops.gate.device_math import gate_terms, log_gate
# Triton is optional: without it the kernels below are never launched.
from gatedfwa.ops.triton_support import cdiv, jit, next_power_of_2, tl, triton

__all__ = ["ELEMENTS_PER_PROGRAM", "allocate", "gate_forward_2d", "gate_backward_2d"]


# Elements (rows x heads) each program handles: on an H200 the backward was fastest with 1024
# (4 warps) of 1024-8192 elements and 2-16 warps, at B*T*H = 2^19 and 2^23. Tests lower it to
# get many programs and ragged tails.
ELEMENTS_PER_PROGRAM = 1024
NUM_WARPS = 4

@jit
def _tile_offsets(pid, num_rows, num_heads, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < num_rows) & (heads[None, :] < num_heads)
    return rows, heads, mask


@jit
def _load_gate_inputs(
    a_ptr, beta_pre_ptr, bias_ptr, rows, heads, mask, a_row_stride, beta_row_stride, num_heads,
    HAS_BIAS: tl.constexpr,
):
    a = tl.load(a_ptr + rows[:, None] * a_row_stride + heads[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + heads, mask=heads < num_heads, other=0.0).to(tl.float32)
        a = a + bias[None, :]
    beta_pre = tl.load(
        beta_pre_ptr + rows[:, None] * beta_row_stride + heads[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    return a, beta_pre


# ======================================================================================
# Kernels. Inputs are 2-D views [rows, H] with unit stride along H: either two separate
# tensors, or the two halves of gate_pre [rows, 2H] (row stride 2H).
# ======================================================================================


@jit
def _gate_forward_kernel(
    a_ptr, beta_pre_ptr, bias_ptr, g_ptr,
    num_rows, num_heads, a_row_stride, beta_row_stride,
    HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """g = min(a, 0) - log1p(exp(-beta |a|)) / beta, written to g [rows, H] float32."""
    rows, heads, mask = _tile_offsets(tl.program_id(0), num_rows, num_heads, BLOCK_ROWS, BLOCK_H)
    a, beta_pre = _load_gate_inputs(
        a_ptr, beta_pre_ptr, bias_ptr, rows, heads, mask, a_row_stride, beta_row_stride, num_heads,
        HAS_BIAS,
    )
    g = log_gate(a, beta_pre)
    tl.store(g_ptr + rows[:, None] * num_heads + heads[None, :], g, mask=mask)


@jit
def _gate_backward_kernel(
    dg_ptr, a_ptr, beta_pre_ptr, bias_ptr, da_ptr, dbeta_pre_ptr, dbias_partial_ptr,
    seqlen, num_heads, a_row_stride, beta_row_stride, da_row_stride, dbeta_row_stride,
    HAS_BIAS: tl.constexpr, DG_BY_HEAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """From dg float32, [rows, H] or (DG_BY_HEAD) [B, H, T] as the attention's backward makes
    it, with rows = B * T and T = seqlen: da = dg sigmoid(-z), dbeta_pre = dg h(z) beta'(beta_pre) / beta^2
    with h(z) = log1p(e) + |z| e / (1 + e), and, with a bias, this program's column sums of da
    into dbias_partial [programs, H] float32 (summed on the host: a few KB).

    Grid (time blocks, B): a program covers BLOCK_ROWS positions of one batch row (without
    DG_BY_HEAD the caller passes B = 1, T = rows), so its dg rows are BLOCK_ROWS contiguous
    floats per head: loads along time, while gate_pre is read and d(gate_pre) written along
    heads; the compiler moves the block between the two layouts through shared memory."""
    t = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    batch = tl.program_id(1).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    mask = (t < seqlen)[:, None] & (heads < num_heads)[None, :]
    rows = batch * seqlen + t
    a, beta_pre = _load_gate_inputs(
        a_ptr, beta_pre_ptr, bias_ptr, rows, heads, mask, a_row_stride, beta_row_stride, num_heads,
        HAS_BIAS,
    )
    if DG_BY_HEAD:
        # Row b * T + t of head h lies at (b * H + h) * T + t.
        dg_offsets = batch * num_heads * seqlen + heads[None, :].to(tl.int64) * seqlen + t[:, None]
    else:
        dg_offsets = rows[:, None] * num_heads + heads[None, :]
    dg = tl.load(dg_ptr + dg_offsets, mask=mask, other=0.0).to(tl.float32)
    beta, z_abs, e, log1p_e = gate_terms(a, beta_pre)
    # One reciprocal serves both sigmoid(-z) and h.
    e_over = e / (1.0 + e)
    # sigmoid(-z): e / (1 + e) when z >= 0, 1 / (1 + e) = 1 - e / (1 + e) when z < 0 (the sign
    # of z is a's); 1 - e/(1+e) >= 1/2 there, so the subtraction loses nothing.
    da_factor = tl.where(a >= 0, e_over, 1.0 - e_over)
    h = log1p_e + z_abs * e_over
    inv_beta = 1.0 / beta
    # beta' = 1 for beta_pre > 0 (beta >= 1), beta' = beta otherwise: 1/beta^2 is never formed
    # for small beta, where it would overflow float32.
    dbeta_factor = h * inv_beta * tl.where(beta_pre > 0, inv_beta, 1.0)
    # dg enters last, in two products: fewer values cross between dg's layout and gate_pre's
    # (about a fifth fewer instructions on sm_90 than multiplying dg in as the terms form).
    da = dg * da_factor
    dbeta_pre = dg * dbeta_factor
    tl.store(da_ptr + rows[:, None] * da_row_stride + heads[None, :], da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(
        dbeta_pre_ptr + rows[:, None] * dbeta_row_stride + heads[None, :],
        dbeta_pre.to(dbeta_pre_ptr.dtype.element_ty), mask=mask,
    )
    if HAS_BIAS:
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        column_sums = tl.sum(tl.where(mask, da, 0.0), axis=0)
        tl.store(dbias_partial_ptr + pid * num_heads + heads, column_sums, mask=heads < num_heads)


# ======================================================================================
# Launchers (2-D views [rows, H], unit stride along H)
# ======================================================================================


def allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer. Tests replace this to fill outputs with NaN, which shows
    any element a kernel fails to write."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_shape(num_rows: int, num_heads: int, elements_per_program: int | None):
    block_h = next_power_of_2(max(num_heads, 1))
    elements = elements_per_program or ELEMENTS_PER_PROGRAM
    block_rows = max(1, min(next_power_of_2(max(num_rows, 1)), elements // block_h))
    return block_rows, block_h, cdiv(num_rows, block_rows)


def _require_triton() -> None:
    if triton is None:
        raise ImportError(
            "the triton backend of the gate needs Triton (pip install triton), "
            "or set GATEDFWA_BACKEND=torch for the PyTorch path"
        )


def gate_forward_2d(a, beta_pre, bias, elements_per_program=None):
    """a, beta_pre [rows, H] (unit stride along H), bias [H] or None -> g [rows, H] float32."""
    _require_triton()
    num_rows, num_heads = a.shape
    g = allocate((num_rows, num_heads), torch.float32, a.device)
    if g.numel() == 0:
        return g
    block_rows, block_h, programs = _launch_shape(num_rows, num_heads, elements_per_program)
    _gate_forward_kernel[(programs,)](
        a, beta_pre, bias if bias is not None else a, g,
        num_rows, num_heads, a.stride(0), beta_pre.stride(0),
        HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=NUM_WARPS,
    )
    return g


def gate_backward_2d(dg, a, beta_pre, bias, da, dbeta_pre, elements_per_program=None, dg_seqlen=None):
    """Writes da and dbeta_pre ([rows, H] views, unit stride along H, any float dtype) from
    dg float32; returns d(bias) [H] float32 when bias is given, else None.

    dg is [rows, H], or, with dg_seqlen = T, the attention backward's [B, H, T] layout
    (rows = B * T): the kernel reads it in place, no transpose is made."""
    _require_triton()
    num_rows, num_heads = a.shape
    if a.numel() == 0:
        return None if bias is None else torch.zeros(num_heads, dtype=torch.float32, device=a.device)
    # Programs never straddle two batch rows, so that dg's rows stay contiguous in each.
    seqlen = dg_seqlen or num_rows
    batch = num_rows // seqlen
    block_rows, block_h, _ = _launch_shape(seqlen, num_heads, elements_per_program)
    grid = (cdiv(seqlen, block_rows), batch)
    partial = (
        allocate((grid[0] * grid[1], num_heads), torch.float32, a.device) if bias is not None else dg
    )
    _gate_backward_kernel[grid](
        dg, a, beta_pre, bias if bias is not None else a, da, dbeta_pre, partial,
        seqlen, num_heads, a.stride(0), beta_pre.stride(0), da.stride(0), dbeta_pre.stride(0),
        HAS_BIAS=bias is not None, DG_BY_HEAD=dg_seqlen is not None,
        BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=NUM_WARPS,
    )
    return None if bias is None else partial.sum(dim=0)
