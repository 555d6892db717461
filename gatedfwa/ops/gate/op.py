"""Fused gate preprocessing: from the gate projections to the log gates g, in one pass each way.

The gate of GatedFWA (docs/gate.md), per token t and query head h:

    a_t    = x_t W_g + b_g
    beta_t = 1 + ELU(x_t W_beta)
    g_t    = logsigmoid(beta_t * a_t) / beta_t          (<= 0)

A layer computes both projections with one matmul, gate_pre = x @ [W_g; W_beta]^T of shape
[B, T, 2H] (a's pre-bias values in the first H columns, beta's pre-activation in the last H).
The forward kernel here reads gate_pre (and b_g) once and writes g [B, T, H] float32, for
users who want the gates themselves. The attention path does not need g: gated_fwa_attention
has the kernel of chunk_sums.py turn gate_pre straight into the chunk-local gate sums the
attention kernels read. Either way, the backward kernel reads the attention's dg, recomputes
the gate terms from gate_pre, and writes d(gate_pre) [B, T, 2H] and partial sums for d(b_g)
in one pass; nothing [B, T, H]-sized is stored between the two.

Numerics follow the stable forms of reference.py (finite values and gradients from
beta ~ 1e-22 to beta ~ 50 and |a| up to 1e4 and beyond); the device functions are in
device_math.py.

Public functions:
    compute_log_gates(a, beta_pre, cu_seqlens=None)         -> g [B, T, H] float32
    log_gates_from_projection(gate_pre, gate_bias)          -> g [B, T, H] float32
    gated_fwa_attention(q, k, v, x, gate_weight, gate_bias, ...)  x -> attention output
"""

from __future__ import annotations

import torch

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.gate import kernels
from gatedfwa.ops.gate.reference import reference_log_gates
from gatedfwa.ops.validation import check_cu_seqlens, check_float_tensor, format_shape

__all__ = ["compute_log_gates", "log_gates_from_projection", "projection_backward", "check_gate_bias"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, N] contiguous -> [B*T, N] view."""
    return x.reshape(-1, x.shape[-1])


# ======================================================================================
# Custom ops (opaque to torch.compile, with registered backward)
# ======================================================================================


def _log_gates_forward(a: torch.Tensor, beta_pre: torch.Tensor) -> torch.Tensor:
    """a, beta_pre [B, T, H] -> g [B, T, H] float32 (the kernel launch)."""
    a, beta_pre = a.contiguous(), beta_pre.contiguous()
    return kernels.gate_forward_2d(_rows(a), _rows(beta_pre), None).view(a.shape)


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
    da = kernels.allocate(a.shape, a.dtype, a.device)
    dbeta_pre = kernels.allocate(beta_pre.shape, beta_pre.dtype, beta_pre.device)
    kernels.gate_backward_2d(_rows(dg.float().contiguous()), _rows(a), _rows(beta_pre), None, _rows(da), _rows(dbeta_pre))
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
    g = kernels.gate_forward_2d(flat[:, :num_heads], flat[:, num_heads:], None if bias is None else bias.contiguous())
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
    d_gate_pre = kernels.allocate(gate_pre.shape, gate_pre.dtype, gate_pre.device)
    d_flat = _rows(d_gate_pre)
    d_bias = kernels.gate_backward_2d(
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


def check_gate_bias(gate_bias, num_heads: int, device: torch.device) -> None:
    """gate_bias is None or a floating [num_heads] tensor on device."""
    if gate_bias is None:
        return
    check_float_tensor("gate_bias", gate_bias, 1, "[query_heads]")
    if gate_bias.shape[0] != num_heads:
        raise ValueError(f"gate_bias must have shape [{num_heads}] (one per query head), got {format_shape(gate_bias)}")
    if gate_bias.device != device:
        raise ValueError(f"gate_bias must be on device {device}, got {gate_bias.device}")


def check_log_gate_args(a, beta_pre, cu_seqlens) -> None:
    check_float_tensor("a", a, 3, "[batch, seqlen, heads]")
    check_float_tensor("beta_pre", beta_pre, 3, "[batch, seqlen, heads]")
    if a.shape != beta_pre.shape:
        raise ValueError(f"a and beta_pre must have the same shape, got a {format_shape(a)} and beta_pre {format_shape(beta_pre)}")
    if a.device != beta_pre.device:
        raise ValueError(f"a and beta_pre must be on one device, got {a.device} and {beta_pre.device}")
    check_cu_seqlens(cu_seqlens, a)


def check_projection_args(gate_pre, gate_bias) -> None:
    check_float_tensor("gate_pre", gate_pre, 3, "[batch, seqlen, 2 * heads]")
    if gate_pre.shape[-1] % 2 != 0:
        raise ValueError(
            f"gate_pre's last dimension must be even (a's H columns, then beta's H), got {format_shape(gate_pre)}"
        )
    check_gate_bias(gate_bias, gate_pre.shape[-1] // 2, gate_pre.device)


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

    Triton kernel for CUDA tensors, the stable PyTorch path (gate/reference.py) elsewhere;
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
