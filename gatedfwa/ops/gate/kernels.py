"""Triton kernels of the gate: the log gates from the gate's inputs and their backward, on
2-D views [rows, H] with unit stride along H, and their launchers (block sizes: launch.py).
The formula comes from a GateSpec (spec.py): its device functions reach the kernels as
constexpr arguments (VALUE, DERIVATIVES) and are inlined, and INPUTS (1 or 2) says how many
inputs per head are read and differentiated. The op and its autograd are in op.py."""

from __future__ import annotations

import torch

from gatedfwa.ops.gate import launch
from gatedfwa.ops.gate.registry import DEFAULT_GATE, gate_spec
from gatedfwa.ops.gate.spec import GateSpec
# Triton is optional: without it the kernels below are never launched.
from gatedfwa.ops.common.triton_support import cdiv, jit, tl, triton

__all__ = ["gate_forward_2d", "gate_backward_2d"]


@jit
def _tile_offsets(pid, num_rows, num_heads, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < num_rows) & (heads[None, :] < num_heads)
    return rows, heads, mask


@jit
def _load_a(a_ptr, bias_ptr, rows, heads, mask, a_row_stride, num_heads, HAS_BIAS: tl.constexpr):
    """Input 0, a, as float32, with the bias added."""
    a = tl.load(a_ptr + rows[:, None] * a_row_stride + heads[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + heads, mask=heads < num_heads, other=0.0).to(tl.float32)
        a = a + bias[None, :]
    return a


@jit
def _load_second(second_ptr, rows, heads, mask, second_row_stride):
    """Input 1 (beta_pre for the sharpened gate) as float32."""
    return tl.load(second_ptr + rows[:, None] * second_row_stride + heads[None, :], mask=mask, other=0.0).to(tl.float32)


# ======================================================================================
# Kernels. Inputs are 2-D views [rows, H] with unit stride along H: separate tensors, or
# the column blocks of gate_pre [rows, INPUTS * H] (row stride INPUTS * H). With INPUTS == 1
# the second input's pointers and strides are placeholders, never read or written.
# ======================================================================================


@jit
def _gate_forward_kernel(
    a_ptr, second_ptr, bias_ptr, g_ptr,
    num_rows, num_heads, a_row_stride, second_row_stride,
    VALUE: tl.constexpr, INPUTS: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """g = VALUE(a[, second]), written to g [rows, H] float32."""
    rows, heads, mask = _tile_offsets(tl.program_id(0), num_rows, num_heads, BLOCK_ROWS, BLOCK_H)
    a = _load_a(a_ptr, bias_ptr, rows, heads, mask, a_row_stride, num_heads, HAS_BIAS)
    if INPUTS == 2:
        second = _load_second(second_ptr, rows, heads, mask, second_row_stride)
        g = VALUE(a, second)
    else:
        g = VALUE(a)
    tl.store(g_ptr + rows[:, None] * num_heads + heads[None, :], g, mask=mask)


@jit
def _gate_backward_kernel(
    dg_ptr, a_ptr, second_ptr, bias_ptr, da_ptr, dsecond_ptr, dbias_partial_ptr,
    seqlen, num_heads, a_row_stride, second_row_stride, da_row_stride, dsecond_row_stride,
    DERIVATIVES: tl.constexpr, INPUTS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DG_BY_HEAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """From dg float32, [rows, H] or (DG_BY_HEAD) [B, H, T] as the attention's backward makes
    it, with rows = B * T and T = seqlen: da = dg dg/da and (INPUTS == 2) dsecond = dg dg/dsecond,
    the factors from DERIVATIVES (for the sharpened gate, dg/da = sigmoid(-z) and
    dg/dbeta_pre = h(z) beta'(beta_pre) / beta^2: device_math.log_gate_derivatives), and, with a
    bias, this program's column sums of da into dbias_partial [programs, H] float32 (summed on
    the host: a few KB).

    Grid (time blocks, B): a program covers BLOCK_ROWS positions of one batch row (without
    DG_BY_HEAD the caller passes B = 1, T = rows), so its dg rows are BLOCK_ROWS contiguous
    floats per head: loads along time, while gate_pre is read and d(gate_pre) written along
    heads; the compiler moves the block between the two layouts through shared memory."""
    t = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    batch = tl.program_id(1).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    mask = (t < seqlen)[:, None] & (heads < num_heads)[None, :]
    rows = batch * seqlen + t
    a = _load_a(a_ptr, bias_ptr, rows, heads, mask, a_row_stride, num_heads, HAS_BIAS)
    if INPUTS == 2:
        second = _load_second(second_ptr, rows, heads, mask, second_row_stride)
    if DG_BY_HEAD:
        # Row b * T + t of head h lies at (b * H + h) * T + t.
        dg_offsets = batch * num_heads * seqlen + heads[None, :].to(tl.int64) * seqlen + t[:, None]
    else:
        dg_offsets = rows[:, None] * num_heads + heads[None, :]
    dg = tl.load(dg_ptr + dg_offsets, mask=mask, other=0.0).to(tl.float32)
    # dg enters last, in one product per input: fewer values cross between dg's layout and
    # gate_pre's (about a fifth fewer instructions on sm_90 than multiplying dg in as the
    # terms form).
    if INPUTS == 2:
        da_factor, dsecond_factor = DERIVATIVES(a, second)
        da = dg * da_factor
        dsecond = dg * dsecond_factor
    else:
        da = dg * DERIVATIVES(a)
    tl.store(da_ptr + rows[:, None] * da_row_stride + heads[None, :], da.to(da_ptr.dtype.element_ty), mask=mask)
    if INPUTS == 2:
        tl.store(
            dsecond_ptr + rows[:, None] * dsecond_row_stride + heads[None, :],
            dsecond.to(dsecond_ptr.dtype.element_ty), mask=mask,
        )
    if HAS_BIAS:
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        column_sums = tl.sum(tl.where(mask, da, 0.0), axis=0)
        tl.store(dbias_partial_ptr + pid * num_heads + heads, column_sums, mask=heads < num_heads)


# ======================================================================================
# Launchers (2-D views [rows, H], unit stride along H)
# ======================================================================================


def _require_triton() -> None:
    if triton is None:
        raise ImportError(
            "the triton backend of the gate needs Triton (pip install triton), "
            "or set GATEDFWA_BACKEND=torch for the PyTorch path"
        )


def _second_input(spec: GateSpec, a, second, name: str):
    """second as the kernels take it: itself for two-input gates, a placeholder (a, never read)
    for one-input gates."""
    if (second is not None) != (spec.inputs_per_head == 2):
        raise ValueError(
            f"the {spec.name!r} gate takes {spec.inputs_per_head} input(s) per head ({', '.join(spec.input_names)}): "
            f"{name} must be {'given' if spec.inputs_per_head == 2 else 'None'}"
        )
    return a if second is None else second


def gate_forward_2d(a, beta_pre, bias, elements_per_program=None, spec: GateSpec | None = None):
    """a, beta_pre [rows, H] (unit stride along H), bias [H] or None -> g [rows, H] float32.

    spec: the gate (default the sharpened one). beta_pre is its second input (None for a
    one-input gate)."""
    _require_triton()
    spec = spec or gate_spec(DEFAULT_GATE)
    second = _second_input(spec, a, beta_pre, "beta_pre")
    num_rows, num_heads = a.shape
    g = launch.allocate((num_rows, num_heads), torch.float32, a.device)
    if g.numel() == 0:
        return g
    program = launch.program_config(a.device)
    block_rows, block_h, programs = launch.launch_shape(num_rows, num_heads, elements_per_program or program["ELEMENTS"])
    _gate_forward_kernel[(programs,)](
        a, second, bias if bias is not None else a, g,
        num_rows, num_heads, a.stride(0), second.stride(0),
        VALUE=spec.device_value, INPUTS=spec.inputs_per_head,
        HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=program["num_warps"],
    )
    return g


def gate_backward_2d(dg, a, beta_pre, bias, da, dbeta_pre, elements_per_program=None, dg_seqlen=None,
                     spec: GateSpec | None = None):
    """Writes da and dbeta_pre ([rows, H] views, unit stride along H, any float dtype) from
    dg float32; returns d(bias) [H] float32 when bias is given, else None.

    dg is [rows, H], or, with dg_seqlen = T, the attention backward's [B, H, T] layout
    (rows = B * T): the kernel reads it in place, no transpose is made. spec: the gate
    (default the sharpened one); beta_pre and dbeta_pre are its second input and that
    input's gradient (both None for a one-input gate)."""
    _require_triton()
    spec = spec or gate_spec(DEFAULT_GATE)
    second = _second_input(spec, a, beta_pre, "beta_pre")
    dsecond = _second_input(spec, da, dbeta_pre, "dbeta_pre")
    num_rows, num_heads = a.shape
    if a.numel() == 0:
        return None if bias is None else torch.zeros(num_heads, dtype=torch.float32, device=a.device)
    # Programs never straddle two batch rows, so that dg's rows stay contiguous in each.
    seqlen = dg_seqlen or num_rows
    batch = num_rows // seqlen
    program = launch.program_config(a.device)
    block_rows, block_h, _ = launch.launch_shape(seqlen, num_heads, elements_per_program or program["ELEMENTS"])
    grid = (cdiv(seqlen, block_rows), batch)
    partial = (
        launch.allocate((grid[0] * grid[1], num_heads), torch.float32, a.device) if bias is not None else dg
    )
    _gate_backward_kernel[grid](
        dg, a, second, bias if bias is not None else a, da, dsecond, partial,
        seqlen, num_heads, a.stride(0), second.stride(0), da.stride(0), dsecond.stride(0),
        DERIVATIVES=spec.device_derivatives, INPUTS=spec.inputs_per_head,
        HAS_BIAS=bias is not None, DG_BY_HEAD=dg_seqlen is not None,
        BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=program["num_warps"],
    )
    return None if bias is None else partial.sum(dim=0)
