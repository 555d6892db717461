"""Root-mean-square normalisation (RMSNorm), used before each block and on queries/keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

    The statistics are taken in float32 whatever x's dtype (a bf16 mean of squares loses
    about 3 significant bits); the result is returned in x's dtype.

    The whole formula is torch's F.rms_norm on float32 copies of x and the weight (one fused
    kernel on CUDA, where the spelled-out formula is six: a decode step runs two or four
    norms per layer, and each elementwise op is a kernel launch).

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
