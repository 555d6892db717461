"""Fused gate preprocessing: from the gate projections to the log gates g, in one pass each way.

The gate of GatedFWA (docs/gate.md), per token t and query head h:

    a_t    = x_t W_g + b_g
    beta_t = 1 + ELU(x_t W_beta)
    g_t    = logsigmoid(beta_t * a_t) / beta_t          (<= 0)

A layer computes both projections with one matmul, gate_pre = x @ [W_g; W_beta]^T of shape
[B, T, 2H] (a's pre-bias values in the first H columns, beta's pre-activation in the last H).
The forward kernel here reads gate_pre (and b_g) once and writes g [B, T, H] float32, for
users who want the gates themselves. The attention path does not need g: gated_fwa_attention
has the kernel of gate_sums.py turn gate_pre straight into the chunk-local gate sums the
attention kernels read. Either way, the backward kernel reads the attention's dg, recomputes
the gate terms from gate_pre, and writes d(gate_pre) [B, T, 2H] and partial sums for d(b_g)
in one pass; nothing [B, T, H]-sized is stored between the two.

Numerics follow the stable forms of gate_reference.py (finite values and gradients from
beta ~ 1e-22 to beta ~ 50 and |a| up to 1e4 and beyond); the device functions are in
gate_math.py.

Public functions:
    compute_log_gates(a, beta_pre, cu_seqlens=None)         -> g [B, T, H] float32
    log_gates_from_projection(gate_pre, gate_bias)          -> g [B, T, H] float32
    gated_fwa_attention(q, k, v, x, gate_weight, gate_bias, ...)  x -> attention output
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatedfwa.ops.api import LN2, gated_window_attention, select_backend
from gatedfwa.ops.gate_attention import gate_attention
from gatedfwa.ops.gate_reference import reference_log_gates
from gatedfwa.ops.validation import format_shape, check_attention_args, check_cu_seqlens
from gatedfwa.ops.gate_math import gate_terms, log_gate
# Triton is optional: without it the kernels below are never launched.
from gatedfwa.ops.triton_support import jit as _jit
from gatedfwa.ops.triton_support import cdiv, next_power_of_2, tl, triton


__all__ = ["compute_log_gates", "log_gates_from_projection", "gated_fwa_attention"]

# Elements (rows x heads) each program handles: on an H200 the backward was fastest with 1024
# (4 warps) of 1024-8192 elements and 2-16 warps, at B*T*H = 2^19 and 2^23. Tests lower it to
# get many programs and ragged tails.
ELEMENTS_PER_PROGRAM = 1024
NUM_WARPS = 4

@_jit
def _tile_offsets(pid, num_rows, num_heads, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < num_rows) & (heads[None, :] < num_heads)
    return rows, heads, mask


@_jit
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


@_jit
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


@_jit
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


def _allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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
    g = _allocate((num_rows, num_heads), torch.float32, a.device)
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
        _allocate((grid[0] * grid[1], num_heads), torch.float32, a.device) if bias is not None else dg
    )
    _gate_backward_kernel[grid](
        dg, a, beta_pre, bias if bias is not None else a, da, dbeta_pre, partial,
        seqlen, num_heads, a.stride(0), beta_pre.stride(0), da.stride(0), dbeta_pre.stride(0),
        HAS_BIAS=bias is not None, DG_BY_HEAD=dg_seqlen is not None,
        BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=NUM_WARPS,
    )
    return None if bias is None else partial.sum(dim=0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, N] contiguous -> [B*T, N] view."""
    return x.reshape(-1, x.shape[-1])


# ======================================================================================
# Custom ops (opaque to torch.compile, with registered backward)
# ======================================================================================


def _log_gates_forward(a: torch.Tensor, beta_pre: torch.Tensor) -> torch.Tensor:
    """a, beta_pre [B, T, H] -> g [B, T, H] float32 (the kernel launch)."""
    a, beta_pre = a.contiguous(), beta_pre.contiguous()
    return gate_forward_2d(_rows(a), _rows(beta_pre), None).view(a.shape)


@torch.library.custom_op("gatedfwa::log_gates", mutates_args=(), device_types=None)
def _log_gates_op(a: torch.Tensor, beta_pre: torch.Tensor) -> torch.Tensor:
    return _log_gates_forward(a, beta_pre)


@_log_gates_op.register_fake
def _(a, beta_pre):
    return a.new_empty(a.shape, dtype=torch.float32)


@torch.library.custom_op("gatedfwa::log_gates_backward", mutates_args=(), device_types=None)
def _log_gates_backward_op(
    dg: torch.Tensor, a: torch.Tensor, beta_pre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_gates_backward_impl(dg, a, beta_pre)


def _log_gates_backward_impl(dg, a, beta_pre):
    """(da, dbeta_pre) in a's and beta_pre's dtypes from dg [B, T, H]."""
    a, beta_pre = a.contiguous(), beta_pre.contiguous()
    da = _allocate(a.shape, a.dtype, a.device)
    dbeta_pre = _allocate(beta_pre.shape, beta_pre.dtype, beta_pre.device)
    gate_backward_2d(_rows(dg.float().contiguous()), _rows(a), _rows(beta_pre), None, _rows(da), _rows(dbeta_pre))
    return da, dbeta_pre


@_log_gates_backward_op.register_fake
def _(dg, a, beta_pre):
    return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(
        beta_pre, memory_format=torch.contiguous_format
    )


def _log_gates_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _log_gates_backward(ctx, dg, backward=_log_gates_backward_op):
    """(da, dbeta_pre); `backward` is the backward custom op (compiled graphs) or
    _log_gates_backward_impl (eager calls)."""
    a, beta_pre = ctx.saved_tensors
    return backward(dg, a, beta_pre)


_log_gates_op.register_autograd(_log_gates_backward, setup_context=_log_gates_setup)


def _projection_forward(gate_pre: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gate_pre [B, T, 2H], bias [H] or None -> g [B, T, H] float32 (the kernel launch)."""
    gate_pre = gate_pre.contiguous()
    num_heads = gate_pre.shape[-1] // 2
    flat = _rows(gate_pre)
    g = gate_forward_2d(flat[:, :num_heads], flat[:, num_heads:], None if bias is None else bias.contiguous())
    return g.view(*gate_pre.shape[:-1], num_heads)


@torch.library.custom_op("gatedfwa::log_gates_from_projection", mutates_args=(), device_types=None)
def _projection_op(gate_pre: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _projection_forward(gate_pre, bias)


@_projection_op.register_fake
def _(gate_pre, bias):
    return gate_pre.new_empty((*gate_pre.shape[:-1], gate_pre.shape[-1] // 2), dtype=torch.float32)


@torch.library.custom_op("gatedfwa::log_gates_from_projection_backward", mutates_args=(), device_types=None)
def _projection_backward_op(
    dg: torch.Tensor, gate_pre: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d gate_pre [B, T, 2H] in gate_pre's dtype, d bias [H] in bias's dtype, or an
    empty tensor without bias)."""
    return _projection_backward_impl(dg, gate_pre, bias)


def _projection_backward_impl(dg, gate_pre, bias):
    """projection_backward from dg [B, T, H]."""
    return projection_backward(_rows(dg.float().contiguous()), gate_pre, bias)


def projection_backward(dg: torch.Tensor, gate_pre: torch.Tensor, bias: torch.Tensor | None,
                        dg_seqlen: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """d gate_pre [B, T, 2H] (gate_pre's dtype) and d bias [H] (bias's dtype; an empty tensor
    without bias) from dg float32, given as in gate_backward_2d: [B*T, H], or [B, H, T] with
    dg_seqlen = T."""
    gate_pre = gate_pre.contiguous()
    num_heads = gate_pre.shape[-1] // 2
    flat = _rows(gate_pre)
    d_gate_pre = _allocate(gate_pre.shape, gate_pre.dtype, gate_pre.device)
    d_flat = _rows(d_gate_pre)
    d_bias = gate_backward_2d(
        dg, flat[:, :num_heads], flat[:, num_heads:], None if bias is None else bias.contiguous(),
        d_flat[:, :num_heads], d_flat[:, num_heads:], dg_seqlen=dg_seqlen,
    )
    if d_bias is None:
        return d_gate_pre, gate_pre.new_empty((0,))
    return d_gate_pre, d_bias.to(bias.dtype)


@_projection_backward_op.register_fake
def _(dg, gate_pre, bias):
    d_bias = gate_pre.new_empty((0,)) if bias is None else torch.empty_like(bias)
    return torch.empty_like(gate_pre, memory_format=torch.contiguous_format), d_bias


def _projection_setup(ctx, inputs, output):
    gate_pre, bias = inputs
    ctx.save_for_backward(gate_pre, bias)
    ctx.has_bias = bias is not None


def _projection_backward(ctx, dg, backward=_projection_backward_op):
    """(d gate_pre, d bias or None); `backward` is the backward custom op (compiled graphs)
    or _projection_backward_impl (eager calls)."""
    gate_pre, bias = ctx.saved_tensors
    d_gate_pre, d_bias = backward(dg, gate_pre, bias)
    return d_gate_pre, (d_bias if ctx.has_bias else None)


_projection_op.register_autograd(_projection_backward, setup_context=_projection_setup)


# Eager calls skip the custom ops' dispatch (tens of microseconds of host time per call):
# these autograd.Functions run the same launches. torch.compile gets the custom ops.


class _LogGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _log_gates_setup(ctx, inputs, None)
        return _log_gates_forward(*inputs)

    @staticmethod
    def backward(ctx, dg):
        return _log_gates_backward(ctx, dg, _log_gates_backward_impl)


class _Projection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _projection_setup(ctx, inputs, None)
        return _projection_forward(*inputs)

    @staticmethod
    def backward(ctx, dg):
        return _projection_backward(ctx, dg, _projection_backward_impl)


# ======================================================================================
# Validation
# ======================================================================================


def _check_float_tensor(name: str, x, dims: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions {layout}, got shape {format_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_bias(gate_bias, num_heads: int, device: torch.device) -> None:
    if gate_bias is None:
        return
    _check_float_tensor("gate_bias", gate_bias, 1, "[query_heads]")
    if gate_bias.shape[0] != num_heads:
        raise ValueError(f"gate_bias must have shape [{num_heads}] (one per query head), got {format_shape(gate_bias)}")
    if gate_bias.device != device:
        raise ValueError(f"gate_bias must be on device {device}, got {gate_bias.device}")


def check_log_gate_args(a, beta_pre, cu_seqlens) -> None:
    _check_float_tensor("a", a, 3, "[batch, seqlen, heads]")
    _check_float_tensor("beta_pre", beta_pre, 3, "[batch, seqlen, heads]")
    if a.shape != beta_pre.shape:
        raise ValueError(f"a and beta_pre must have the same shape, got a {format_shape(a)} and beta_pre {format_shape(beta_pre)}")
    if a.device != beta_pre.device:
        raise ValueError(f"a and beta_pre must be on one device, got {a.device} and {beta_pre.device}")
    check_cu_seqlens(cu_seqlens, a)


def check_projection_args(gate_pre, gate_bias) -> None:
    _check_float_tensor("gate_pre", gate_pre, 3, "[batch, seqlen, 2 * heads]")
    if gate_pre.shape[-1] % 2 != 0:
        raise ValueError(
            f"gate_pre's last dimension must be even (a's H columns, then beta's H), got {format_shape(gate_pre)}"
        )
    _check_bias(gate_bias, gate_pre.shape[-1] // 2, gate_pre.device)


def check_gated_fwa_args(q, k, v, x, gate_weight, gate_bias, window_size, scale, cu_seqlens) -> None:
    check_attention_args(q, k, v, None, window_size, scale, cu_seqlens)
    num_q_heads = q.shape[2]
    _check_float_tensor("x", x, 3, "[batch, seqlen, model_dim]")
    if x.shape[:2] != q.shape[:2]:
        raise ValueError(f"x and q must agree in batch and seqlen, got x {format_shape(x)} and q {format_shape(q)}")
    if x.device != q.device:
        raise ValueError(f"x must be on q's device {q.device}, got {x.device}")
    _check_float_tensor("gate_weight", gate_weight, 2, "[2 * query_heads, model_dim]")
    expected = (2 * num_q_heads, x.shape[-1])
    if tuple(gate_weight.shape) != expected:
        raise ValueError(
            f"gate_weight must have shape [2 * query_heads, model_dim] = {list(expected)} "
            f"(rows 0..{num_q_heads - 1} W_g, then W_beta), got {format_shape(gate_weight)}"
        )
    if gate_weight.dtype != x.dtype:
        raise TypeError(f"gate_weight must have x's dtype {x.dtype}, got {gate_weight.dtype}")
    if gate_weight.device != x.device:
        raise ValueError(f"gate_weight must be on x's device {x.device}, got {gate_weight.device}")
    _check_bias(gate_bias, num_q_heads, x.device)


# ======================================================================================
# Public API
# ======================================================================================


def compute_log_gates(
    a: torch.Tensor, beta_pre: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """The GatedFWA log gates g = logsigmoid(beta * a) / beta, beta = 1 + ELU(beta_pre).

    Args:
        a: [B, T, H] gate pre-activation (x W_g + b_g), any floating dtype.
        beta_pre: [B, T, H] beta's pre-activation (x W_beta), any floating dtype.
        cu_seqlens: int32 [N + 1] offsets of packed sequences (B == 1), or None. Checked like
            the attention op's, for symmetry; the gate is elementwise per token, so sequence
            boundaries change nothing here (the attention kernel keeps sums inside sequences).

    Returns:
        g [B, T, H] float32, <= 0, differentiable with respect to a and beta_pre. Finite for
        beta_pre >= -88 (beta ~ 1e-38; g ~ -log(2) / beta reaches float32's limit below).

    Triton kernel for CUDA tensors, the stable PyTorch path (gate_reference.py) elsewhere;
    GATEDFWA_BACKEND=triton|torch forces one.
    """
    check_log_gate_args(a, beta_pre, cu_seqlens)
    if select_backend(a.device) == "triton":
        return _log_gates_op(a, beta_pre) if torch.compiler.is_compiling() else _LogGates.apply(a, beta_pre)
    return reference_log_gates(a, beta_pre).float()


def log_gates_from_projection(gate_pre: torch.Tensor, gate_bias: torch.Tensor | None) -> torch.Tensor:
    """Log gates from the fused gate projection, in one pass over it.

    Args:
        gate_pre: [B, T, 2H] = x @ gate_weight^T; columns 0..H-1 are x W_g (without bias),
            columns H..2H-1 are x W_beta. Any floating dtype.
        gate_bias: [H] b_g, or None.

    Returns:
        g [B, T, H] float32 (what gated_window_attention takes as g), differentiable with
        respect to gate_pre and gate_bias; the backward writes d(gate_pre) in one pass.
    """
    check_projection_args(gate_pre, gate_bias)
    if select_backend(gate_pre.device) == "triton":
        if torch.compiler.is_compiling():
            return _projection_op(gate_pre, gate_bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (gate_pre, gate_bias)):
            return _Projection.apply(gate_pre, gate_bias)
        # Inference (decoding calls this once per layer per token): the launcher directly.
        return _projection_forward(gate_pre, gate_bias)
    num_heads = gate_pre.shape[-1] // 2
    a = gate_pre[..., :num_heads].float()
    if gate_bias is not None:
        a = a + gate_bias.float()
    return reference_log_gates(a, gate_pre[..., num_heads:]).float()


def gated_fwa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    window_size: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """GatedFWA from projections to output: the gate from x, then gated window attention.

        gate_pre = x @ gate_weight^T                           [B, T, 2HQ]
        g        = log_gates_from_projection(gate_pre, gate_bias)   [B, T, HQ] float32
        o        = gated_window_attention(q, k, v, g, window_size, scale, cu_seqlens)
    (the composition it equals; see below for what runs).

    Args:
        q: [B, T, HQ, D]; k, v: [B, T, H, D] (see gated_window_attention).
        x: [B, T, C] the layer input the gate reads.
        gate_weight: [2 * HQ, C] in x's dtype; rows 0..HQ-1 are W_g, rows HQ..2HQ-1 W_beta.
        gate_bias: [HQ] b_g (W_beta has no bias), or None.
        window_size, scale, cu_seqlens, return_lse: as in gated_window_attention.

    Returns:
        o [B, T, HQ, D] in q's dtype, or (o, lse [B, HQ, T]) with return_lse. Gradients flow
        to q, k, v, x, gate_weight and gate_bias.

    On the Triton backend the gate and the attention run as one op (gate_attention.py): one
    pass over gate_pre writes the chunk-local gate sums the attention kernels read, g is never
    stored, and the backward turns the attention's dg into d(gate_pre) in one pass.
    """
    check_gated_fwa_args(q, k, v, x, gate_weight, gate_bias, window_size, scale, cu_seqlens)
    gate_pre = F.linear(x, gate_weight)
    if select_backend(q.device) == "triton":
        scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
        o, lse2 = gate_attention(q, k, v, gate_pre, gate_bias, window_size, scale, cu_seqlens)
        return (o, lse2.detach() * LN2) if return_lse else o
    g = log_gates_from_projection(gate_pre, gate_bias)
    return gated_window_attention(
        q, k, v, g, window_size=window_size, scale=scale, cu_seqlens=cu_seqlens, return_lse=return_lse
    )
