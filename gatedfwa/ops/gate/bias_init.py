"""The initial gate bias b_g from a range of per-step retentions.

At initialisation the projections x W are small, so a gate whose log gate is about
logsigmoid(a) at small inputs (both gates of gatedfwa/ops/gate/kinds/) retains
exp(g) ~ sigmoid(b_g) per step. b_g is set per query head so that these retentions run from
``retention_range[0]`` to ``retention_range[1]`` (default 0.99 .. 0.999), geometrically in
the decay 1 - sigmoid(b_g): memory horizons of about 100 to 1000 tokens.
"""

from __future__ import annotations

import math

import torch

__all__ = ["gate_bias_init"]


def gate_bias_init(num_heads: int, retention_range: tuple[float, float] = (0.99, 0.999)) -> torch.Tensor:
    """b_g [num_heads] float32 with sigmoid(b_g) running from retention_range[0] to [1], the
    decays 1 - sigmoid(b_g) spaced geometrically (one head: the geometric middle)."""
    low, high = retention_range
    if not (0.0 < low < 1.0 and 0.0 < high < 1.0):
        raise ValueError(f"gate_init_range values must lie strictly between 0 and 1, got {retention_range}")
    log_decay_low, log_decay_high = math.log(1.0 - low), math.log(1.0 - high)
    if num_heads == 1:
        fractions = torch.tensor([0.5], dtype=torch.float64)
    else:
        fractions = torch.linspace(0.0, 1.0, num_heads, dtype=torch.float64)
    decay = torch.exp(log_decay_low + fractions * (log_decay_high - log_decay_low))
    retention = 1.0 - decay
    return torch.log(retention / decay).float()  # logit(retention)
