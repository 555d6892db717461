"""An independent, slow re-implementation of GatedFWAttention for tests: every step written
out from the formulas (complex-number rotary, literal gate formula, the naive quadratic
attention), run in any dtype, float64 for the reference. NSAttention (the NSA kinds) takes the
same steps with NSA's quadratic reference (gatedfwa/ops/nsa/naive.py) as its attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatedfwa.ops.nsa.naive import naive_nsa_attention
from gatedfwa.ops.window_attention.naive import naive_gated_window_attention


# Each gate's formula written out literally (gatedfwa/ops/gate/kinds/), by the layer's gate name.
LITERAL_GATES = {
    "sharpened": lambda a, beta_pre: F.logsigmoid((1 + F.elu(beta_pre)) * a) / (1 + F.elu(beta_pre)),
    "forgetting": lambda a: F.logsigmoid(a),
}


def _rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, positions, theta):
    """x [B, T, H, D]: channels (i, i + D/2) as the complex number x_i + i x_{i+D/2},
    multiplied by exp(i * position * theta^(-2i/D))."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / x.shape[-1])
    angle = positions.to(x.device).double()[:, :, None, None] * freqs
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def reference_attention_layer(layer, x, position_ids=None, dtype=torch.float64, differentiable=False):
    """GatedFWAttention's (or NSAttention's) output for x [B, T, C] (no padding), every step
    in ``dtype``; with ``differentiable`` gradients flow back to x and the layer's parameters."""
    keep = (lambda t: t) if differentiable else (lambda t: t.detach())
    p = {name: keep(t).to(dtype) for name, t in layer.named_parameters()}
    x = keep(x).to(dtype)
    batch, seqlen, _ = x.shape
    hq, h, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    if position_ids is None:
        position_ids = torch.arange(seqlen, device=x.device)[None].expand(batch, seqlen)
    q = (x @ p["q_proj.weight"].T).view(batch, seqlen, hq, d)
    k = (x @ p["k_proj.weight"].T).view(batch, seqlen, h, d)
    v = (x @ p["v_proj.weight"].T).view(batch, seqlen, h, d)
    if layer.token_shift:
        mix = torch.sigmoid(x @ p["shift_proj.weight"].T)[..., None]
        k_prev = F.pad(k, (0, 0, 0, 0, 1, 0))[:, :-1]
        v_prev = F.pad(v, (0, 0, 0, 0, 1, 0))[:, :-1]
        k = (1 - mix[:, :, :h]) * k + mix[:, :, :h] * k_prev
        v = (1 - mix[:, :, h:]) * v + mix[:, :, h:] * v_prev
    if layer.q_norm is not None:
        q = _rms(q, p["q_norm.weight"], layer.q_norm.eps)
        k = _rms(k, p["k_norm.weight"], layer.k_norm.eps)
    q = _rotate(q, position_ids, layer.rope_theta)
    k = _rotate(k, position_ids, layer.rope_theta)
    g = None
    if layer.use_gate:
        # decay_gate_proj's rows: one block of HQ per gate input, a's first (it takes the bias).
        inputs = (x @ p["decay_gate_proj.weight"].T).split(hq, dim=-1)
        g = LITERAL_GATES[layer.gate](inputs[0] + p["decay_gate_bias"], *inputs[1:])
    if hasattr(layer, "branch_gate_proj"):
        branch_gates = torch.sigmoid(x @ p["branch_gate_proj.weight"].T).view(batch, seqlen, 3, hq)
        o, _ = naive_nsa_attention(q, k, v, g, *branch_gates.unbind(2), block_size=layer.block_size,
                                   block_counts=layer.block_counts, window_size=layer.window_size, scale=layer.scale)
    else:
        o, _ = naive_gated_window_attention(q, k, v, g, layer.window_size, layer.scale)
    o = o.reshape(batch, seqlen, hq * d)
    if layer.output_gate_proj is not None:
        o = o * torch.sigmoid(x @ p["output_gate_proj.weight"].T)
    return o @ p["o_proj.weight"].T
