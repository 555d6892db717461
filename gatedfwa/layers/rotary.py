"""Rotary position embeddings (RoPE), rotate-half layout.

Channel i < D/2 of a head is paired with channel i + D/2; the pair is rotated by the angle
position * theta^(-2i/D). A dot product of two rotated vectors then depends on their
positions only through the difference, which is what lets a left-padded row (positions
counted from its first real token) compute exactly what it computes alone.

The rotation of a pair (a, b) = (x_i, x_{i+D/2}) by angle t is (a cos t - b sin t,
b cos t + a sin t). Over the whole head that is

    x * cos_full + rotate_half(x) * sin_signed,     rotate_half(x) = (x_{D/2..D-1}, x_{0..D/2-1})

with cos_full = (cos t, cos t) and sin_signed = (-sin t, sin t) along D. The tables are
built once per forward (the model shares them across layers); applying them then costs
one concatenation, two products and a sum per tensor, which matters when decoding one
token at a time, where every elementwise op is a kernel launch.
"""

from __future__ import annotations

import torch

__all__ = ["rotary_angles", "apply_rotary"]


def rotary_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation tables at the given positions.

    Args:
        position_ids: [B, T] integer positions.
        head_dim: D, even.
        theta: base of the frequencies (rope_theta).

    Returns:
        (cos, sin), each [B, T, 1, D] float32 (broadcast over heads), full width for the
        rotate-half layout: cos = (cos t, cos t), sin = (-sin t, sin t), t [B, T, D/2] the
        angles. :func:`apply_rotary` takes them.

    The frequencies are computed here rather than kept in a buffer: there is nothing to save,
    load or re-initialise, and it costs D/2 values per call.
    """
    half = head_dim // 2
    exponents = torch.arange(half, device=position_ids.device, dtype=torch.float32) * (2.0 / head_dim)
    inv_freq = theta ** (-exponents)  # [D/2]
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = angles.cos(), angles.sin()
    cos_full = torch.cat((cos, cos), dim=-1)
    sin_signed = torch.cat((-sin, sin), dim=-1)
    return cos_full[:, :, None, :], sin_signed[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the tables of :func:`rotary_angles`; computed in float32,
    returned in x's dtype. (Adding the product with -sin is exactly subtracting the product
    with sin: the result is bit for bit the pairwise formula of the module docstring.)"""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated_half = torch.cat((x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated_half * sin).to(x.dtype)
