"""Inputs of the window attention benchmarks (bench_attention.py, check_attention.py,
sweep_attention.py, profile_attention_kernels.py): random q, k, v and log gates, and packed
short sequences. One definition, so that every script measures the same kind of input."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype=torch.bfloat16, gate=True, requires_grad=False,
                device=None):
    """q [B, T, HQ, D], k and v [B, T, H, D] from N(0, 1) in dtype, and the log gates g
    [B, T, HQ] float32 as logsigmoid(N(0, 1) + 3) (mean about -0.07), or None without gate."""
    device = DEVICE if device is None else device
    q = torch.randn(batch, seqlen, q_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(batch, seqlen, q_heads, device=device) + 3) if gate else None
    if requires_grad:
        for x in (q, k, v, g):
            if x is not None:
                x.requires_grad_()
    return q, k, v, g


def short_sequences(total: int, device=None):
    """cu_seqlens (int32) of sequences of 256-2048 tokens (a fixed draw) packed into `total`
    tokens, and their lengths."""
    device = DEVICE if device is None else device
    cuts = [0]
    generator = torch.Generator().manual_seed(0)
    while cuts[-1] < total:
        cuts.append(min(total, cuts[-1] + int(torch.randint(256, 2049, (1,), generator=generator))))
    return torch.tensor(cuts, dtype=torch.int32, device=device), [b - a for a, b in zip(cuts, cuts[1:])]
