"""Rotary position embeddings (RoPE), rotate-half layout.

Channel i < D/2 of a head is paired with channel i + D/2; the pair is rotated by the angle
position * theta^(-2i/D). A dot product of two rotated vectors then depends on their
positions only through the difference, which is what lets a left-padded row (positions
counted from its first real token) compute exactly what it computes alone.
"""

from __future__ import annotations

import torch

__all__ = ["rotary_angles", "apply_rotary"]


def rotary_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles.

    Args:
        position_ids: [B, T] integer positions.
        head_dim: D, even.
        theta: base of the frequencies (rope_theta).

    Returns:
        (cos, sin), each [B, T, 1, D/2] float32 (broadcast over heads).

    The frequencies are computed here rather than kept in a buffer: there is nothing to save,
    load or re-initialise, and it costs D/2 values per call.
    """
    half = head_dim // 2
    exponents = torch.arange(half, device=position_ids.device, dtype=torch.float32) * (2.0 / head_dim)
    inv_freq = theta ** (-exponents)  # [D/2]
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by angles from :func:`rotary_angles`; computed in float32,
    returned in x's dtype."""
    half = x.shape[-1] // 2
    x32 = x.float()
    first, second = x32[..., :half], x32[..., half:]
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.to(x.dtype)
