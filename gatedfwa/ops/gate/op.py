"""Fused gate preprocessing: from the gate projections to the log gates g, in one pass each way.

The default gate of GatedFWA (docs/gate.md, "sharpened"), per token t and query head h:

    a_t    = x_t W_g + b_g
    beta_t = 1 + ELU(x_t W_beta)
    g_t    = logsigmoid(beta_t * a_t) / beta_t          (<= 0)

Every function here takes ``gate``, the name of a registered gate (registry.GATES: also
"forgetting", g = logsigmoid(a)); the gate's GateSpec (spec.py) gives its n inputs per head
(2 here: a, beta_pre) and its formula in each form. A layer computes the gate's inputs with
one matmul, gate_pre = x @ gate_weight^T of shape [B, T, n H] (input 0, a's pre-bias values,
in the first H columns; for the default gate beta's pre-activation in the last H). The
forward kernel here reads gate_pre (and b_g) once and writes g [B, T, H] float32, for users
who want the gates themselves. The attention path does not need g: gated_fwa_attention has
the kernel of gatedfwa/ops/window_attention/chunk_sums.py turn gate_pre straight into the
chunk-local gate sums the attention kernels read. Either way, the backward kernel reads the attention's dg, recomputes
the gate terms from gate_pre, and writes d(gate_pre) [B, T, n H] and partial sums for d(b_g)
in one pass; nothing [B, T, H]-sized is stored between the two.

Numerics of the default gate follow the stable forms of kinds/sharpened.py (finite values and
gradients from beta ~ 1e-22 to beta ~ 50 and |a| up to 1e4 and beyond); the device functions
are in device_math.py. On the Triton backend each op is a KernelOp
(gatedfwa/ops/common/custom_op.py): custom ops with a registered backward under
torch.compile, an autograd.Function in eager calls, the launcher alone when no gradient is
recorded.

Public functions:
    compute_log_gates(a, beta_pre, cu_seqlens=None, gate=...)   -> g [B, T, H] float32
    log_gates_from_projection(gate_pre, gate_bias, gate=...)    -> g [B, T, H] float32
    gated_fwa_attention(q, k, v, x, gate_weight, gate_bias, ...)  x -> attention output
"""

from __future__ import annotations

import torch

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.common.custom_op import KernelOp, no_gradient
from gatedfwa.ops.gate import kernels, launch
from gatedfwa.ops.gate.registry import DEFAULT_GATE, gate_spec
from gatedfwa.ops.gate.spec import GateSpec
from gatedfwa.ops.gate.torch_path import torch_log_gates
from gatedfwa.ops.common.validation import check_cu_seqlens, check_float_tensor, format_shape

__all__ = ["compute_log_gates", "log_gates_from_projection", "projection_backward", "check_gate_bias"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, N] contiguous -> [B*T, N] view."""
    return x.reshape(-1, x.shape[-1])


# ======================================================================================
# The Triton path as KernelOps
# ======================================================================================


def _log_gates_forward(a: torch.Tensor, beta_pre: torch.Tensor | None, gate: str = DEFAULT_GATE) -> torch.Tensor:
    """a, beta_pre [B, T, H] (beta_pre None for one-input gates) -> g [B, T, H] float32 (the
    kernel launch)."""
    a = a.contiguous()
    second = None if beta_pre is None else _rows(beta_pre.contiguous())
    return kernels.gate_forward_2d(_rows(a), second, None, spec=gate_spec(gate)).view(a.shape)


def _log_gates_fake(a, beta_pre, gate=DEFAULT_GATE):
    return a.new_empty(a.shape, dtype=torch.float32)


def _log_gates_backward(
    dg: torch.Tensor, a: torch.Tensor, beta_pre: torch.Tensor | None, gate: str = DEFAULT_GATE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, dbeta_pre) in a's and beta_pre's dtypes from dg [B, T, H]; dbeta_pre is an empty
    tensor without beta_pre (one-input gates)."""
    a = a.contiguous()
    da = launch.allocate(a.shape, a.dtype, a.device)
    if beta_pre is None:
        second = dsecond = None
        dbeta_pre = no_gradient(a)
    else:
        beta_pre = beta_pre.contiguous()
        dbeta_pre = launch.allocate(beta_pre.shape, beta_pre.dtype, beta_pre.device)
        second, dsecond = _rows(beta_pre), _rows(dbeta_pre)
    kernels.gate_backward_2d(_rows(dg.float().contiguous()), _rows(a), second, None, _rows(da), dsecond,
                             spec=gate_spec(gate))
    return da, dbeta_pre


def _log_gates_backward_fake(dg, a, beta_pre, gate=DEFAULT_GATE):
    d_second = no_gradient(a) if beta_pre is None else torch.empty_like(beta_pre, memory_format=torch.contiguous_format)
    return torch.empty_like(a, memory_format=torch.contiguous_format), d_second


def _log_gates_save(ctx, inputs, output):
    a, beta_pre, gate = inputs
    ctx.save_for_backward(a, beta_pre)
    ctx.gate = gate
    ctx.has_second = beta_pre is not None


def _log_gates_gradients(ctx, backward, dg):
    """(da, dbeta_pre or None, None)."""
    a, beta_pre = ctx.saved_tensors
    da, dbeta_pre = backward(dg, a, beta_pre, ctx.gate)
    return da, (dbeta_pre if ctx.has_second else None), None


_log_gates = KernelOp(
    "gatedfwa::log_gates", _log_gates_forward, _log_gates_fake, backward=_log_gates_backward,
    backward_fake=_log_gates_backward_fake, save=_log_gates_save, gradients=_log_gates_gradients,
)


def _split_projection(gate_pre: torch.Tensor, spec: GateSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gate_pre [B*T, n H] -> (a [B*T, H], second input [B*T, H] or None) column views."""
    num_heads = gate_pre.shape[-1] // spec.inputs_per_head
    second = gate_pre[:, num_heads:] if spec.inputs_per_head == 2 else None
    return gate_pre[:, :num_heads], second


def _projection_forward(gate_pre: torch.Tensor, bias: torch.Tensor | None, gate: str = DEFAULT_GATE) -> torch.Tensor:
    """gate_pre [B, T, n H], bias [H] or None -> g [B, T, H] float32 (the kernel launch)."""
    spec = gate_spec(gate)
    gate_pre = gate_pre.contiguous()
    num_heads = gate_pre.shape[-1] // spec.inputs_per_head
    a, second = _split_projection(_rows(gate_pre), spec)
    g = kernels.gate_forward_2d(a, second, None if bias is None else bias.contiguous(), spec=spec)
    return g.view(*gate_pre.shape[:-1], num_heads)


def _projection_fake(gate_pre, bias, gate=DEFAULT_GATE):
    num_heads = gate_pre.shape[-1] // gate_spec(gate).inputs_per_head
    return gate_pre.new_empty((*gate_pre.shape[:-1], num_heads), dtype=torch.float32)


def _projection_backward(
    dg: torch.Tensor, gate_pre: torch.Tensor, bias: torch.Tensor | None, gate: str = DEFAULT_GATE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d gate_pre [B, T, n H] in gate_pre's dtype, d bias [H] in bias's dtype, or an
    empty tensor without bias) from dg [B, T, H]."""
    return projection_backward(_rows(dg.float().contiguous()), gate_pre, bias, gate=gate)


def _projection_backward_fake(dg, gate_pre, bias, gate=DEFAULT_GATE):
    d_bias = no_gradient(gate_pre) if bias is None else torch.empty_like(bias)
    return torch.empty_like(gate_pre, memory_format=torch.contiguous_format), d_bias


def _projection_save(ctx, inputs, output):
    gate_pre, bias, gate = inputs
    ctx.save_for_backward(gate_pre, bias)
    ctx.has_bias = bias is not None
    ctx.gate = gate


def _projection_gradients(ctx, backward, dg):
    """(d gate_pre, d bias or None, None)."""
    gate_pre, bias = ctx.saved_tensors
    d_gate_pre, d_bias = backward(dg, gate_pre, bias, ctx.gate)
    return d_gate_pre, (d_bias if ctx.has_bias else None), None


_projection = KernelOp(
    "gatedfwa::log_gates_from_projection", _projection_forward, _projection_fake, backward=_projection_backward,
    backward_fake=_projection_backward_fake, save=_projection_save, gradients=_projection_gradients,
)


def projection_backward(dg: torch.Tensor, gate_pre: torch.Tensor, bias: torch.Tensor | None,
                        dg_seqlen: int | None = None, gate: str = DEFAULT_GATE) -> tuple[torch.Tensor, torch.Tensor]:
    """d gate_pre [B, T, n H] (gate_pre's dtype) and d bias [H] (bias's dtype; an empty tensor
    without bias) from dg float32, given as in gate_backward_2d: [B*T, H], or [B, H, T] with
    dg_seqlen = T. gate: the registered gate's name (n inputs per head)."""
    spec = gate_spec(gate)
    gate_pre = gate_pre.contiguous()
    d_gate_pre = launch.allocate(gate_pre.shape, gate_pre.dtype, gate_pre.device)
    a, second = _split_projection(_rows(gate_pre), spec)
    da, dsecond = _split_projection(_rows(d_gate_pre), spec)
    d_bias = kernels.gate_backward_2d(
        dg, a, second, None if bias is None else bias.contiguous(), da, dsecond, dg_seqlen=dg_seqlen, spec=spec,
    )
    if d_bias is None:
        return d_gate_pre, no_gradient(gate_pre)
    return d_gate_pre, d_bias.to(bias.dtype)


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


def check_log_gate_args(spec: GateSpec, a, beta_pre, cu_seqlens) -> tuple[torch.Tensor, ...]:
    """The gate's inputs, checked: (a,) or (a, beta_pre) as spec takes them."""
    first_name = spec.input_names[0]
    check_float_tensor(first_name, a, 3, "[batch, seqlen, heads]")
    if spec.inputs_per_head == 1:
        if beta_pre is not None:
            raise ValueError(
                f"the {spec.name!r} gate takes one input per head ({first_name}); beta_pre must be None, "
                f"got a tensor of shape {format_shape(beta_pre) if isinstance(beta_pre, torch.Tensor) else beta_pre!r}"
            )
        check_cu_seqlens(cu_seqlens, a)
        return (a,)
    second_name = spec.input_names[1]
    if beta_pre is None:
        raise ValueError(
            f"the {spec.name!r} gate takes two inputs per head ({first_name}, {second_name}): pass {second_name} "
            f"as beta_pre"
        )
    check_float_tensor(second_name, beta_pre, 3, "[batch, seqlen, heads]")
    if a.shape != beta_pre.shape:
        raise ValueError(
            f"{first_name} and {second_name} must have the same shape, got {first_name} {format_shape(a)} "
            f"and {second_name} {format_shape(beta_pre)}"
        )
    if a.device != beta_pre.device:
        raise ValueError(f"{first_name} and {second_name} must be on one device, got {a.device} and {beta_pre.device}")
    check_cu_seqlens(cu_seqlens, a)
    return a, beta_pre


def check_projection_args(gate_pre, gate_bias, spec: GateSpec | None = None) -> None:
    spec = spec or gate_spec(DEFAULT_GATE)
    width = spec.inputs_per_head
    check_float_tensor("gate_pre", gate_pre, 3, f"[batch, seqlen, {width} * heads]")
    if gate_pre.shape[-1] % width != 0:
        multiple = "even" if width == 2 else f"a multiple of {width}"
        raise ValueError(
            f"gate_pre's last dimension must be {multiple} (the {spec.name!r} gate's inputs: "
            f"{spec.projection_layout('H')}), got {format_shape(gate_pre)}"
        )
    check_gate_bias(gate_bias, gate_pre.shape[-1] // width, gate_pre.device)


# ======================================================================================
# Public API
# ======================================================================================


def compute_log_gates(
    a: torch.Tensor,
    beta_pre: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    gate: str = DEFAULT_GATE,
) -> torch.Tensor:
    """The log gates g of a registered gate; by default GatedFWA's
    g = logsigmoid(beta * a) / beta, beta = 1 + ELU(beta_pre).

    Args:
        a: [B, T, H] gate pre-activation (x W_g + b_g), any floating dtype.
        beta_pre: [B, T, H] the gate's second input, any floating dtype: beta's
            pre-activation (x W_beta) for the default gate; None for a one-input gate
            ("forgetting": g = logsigmoid(a)).
        cu_seqlens: int32 [N + 1] offsets of packed sequences (B == 1), or None. Checked like
            the attention op's, for symmetry; the gate is elementwise per token, so sequence
            boundaries change nothing here (the attention kernel keeps sums inside sequences).
        gate: the name of a gate in gatedfwa.ops.gate.registry.GATES ("sharpened", the
            default, or "forgetting").

    Returns:
        g [B, T, H] float32, <= 0, differentiable with respect to the inputs. For the default
        gate finite for beta_pre >= -88 (beta ~ 1e-38; g ~ -log(2) / beta reaches float32's
        limit below).

    Triton kernel for CUDA tensors, the gate's PyTorch path elsewhere (torch_path.py);
    GATEDFWA_BACKEND=triton|torch forces one.
    """
    spec = gate_spec(gate)
    inputs = check_log_gate_args(spec, a, beta_pre, cu_seqlens)
    if select_backend(a.device) == "triton":
        return _log_gates(a, beta_pre, spec.name)
    return torch_log_gates(spec, *inputs).float()


def log_gates_from_projection(gate_pre: torch.Tensor, gate_bias: torch.Tensor | None,
                              gate: str = DEFAULT_GATE) -> torch.Tensor:
    """Log gates from the fused gate projection, in one pass over it.

    Args:
        gate_pre: [B, T, n H] = x @ gate_weight^T, the gate's n inputs per head in column
            blocks of H: columns 0..H-1 are x W_g (a without bias); for the default gate
            (n = 2) columns H..2H-1 are x W_beta. Any floating dtype.
        gate_bias: [H] b_g, added to a, or None.
        gate: the name of a gate in gatedfwa.ops.gate.registry.GATES (default "sharpened").

    Returns:
        g [B, T, H] float32 (what gated_window_attention takes as g), differentiable with
        respect to gate_pre and gate_bias; the backward writes d(gate_pre) in one pass.
    """
    spec = gate_spec(gate)
    check_projection_args(gate_pre, gate_bias, spec)
    if select_backend(gate_pre.device) == "triton":
        # Under no_grad (decoding calls this once per layer per token) the launcher runs alone.
        return _projection(gate_pre, gate_bias, spec.name)
    num_heads = gate_pre.shape[-1] // spec.inputs_per_head
    a = gate_pre[..., :num_heads].float()
    if gate_bias is not None:
        a = a + gate_bias.float()
    inputs = (a,) if spec.inputs_per_head == 1 else (a, gate_pre[..., num_heads:])
    return torch_log_gates(spec, *inputs).float()
