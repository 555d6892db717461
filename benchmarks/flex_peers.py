"""FlexAttention as a peer of the gated window op: the same gated math written as a
score_mod under a sliding-window block mask, and plain sliding-window attention.

The gated math (docs/math.md): the score of query t and key j gains U[t] - U[j], U the
cumulative sum of the log gates along the sequence (float32). FlexAttention adds it in
score_mod from a captured tensor. For a gradient of the gate (dg) that tensor must require
grad, and FlexAttention's backward computes a captured tensor's gradient only where
score_mod indexes it once: U is cloned, the query index reads one copy and the key index the
other. The cumulative sum runs inside the same function, so that torch.compile compiles it
with the attention and its backward carries dU back to g, as gatedfwa's op does.

Layouts: gatedfwa takes q [B, T, HQ, D] and g [B, T, HQ]; FlexAttention takes [B, H, T, D].
"""

from __future__ import annotations

import contextlib

import torch


def allow_recompiles(limit: int = 64) -> None:
    """Let torch.compile keep one graph per shape, gate setting and grad mode: past its default
    limit (8 per function) it would fall back to eager FlexAttention, whose unfused scores
    would be timed instead."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


@contextlib.contextmanager
def unfused_backward_on_cpu():
    """Within: FlexAttention on CPU tensors that require grad runs its unfused path (what runs
    without torch.compile), forward and backward. The CPU build refuses such tensors as
    unsupported (no compiled CPU backward), but the unfused path computes the gradients,
    captured tensors' included (tests/benchmarks/test_bench_attention.py checks them against
    gatedfwa's op). For CPU logic checks only (bench_attention.py --quick): nothing is timed."""
    import torch.nn.attention.flex_attention as module

    check = getattr(module, "_validate_device", None)
    if check is not None:
        module._validate_device = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if check is not None:
            module._validate_device = check


def sliding_window_block_mask(seqlen: int, window: int, device):
    """FlexAttention's block mask of causal attention to the last `window` keys
    (t - window < j <= t), the same for every batch and head."""
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding, B=None, H=None, Q_LEN=seqlen, KV_LEN=seqlen, device=device)


def gated_flex_attention(q, k, v, g, block_mask):
    """Gated window attention through FlexAttention.

    q, k, v: [B, H, T, D]; g: [B, T, H] log gates (any float dtype; summed in float32);
    block_mask: sliding_window_block_mask. Returns o [B, H, T, D]. dg flows where g requires
    grad; a detached g gives the same forward and a backward without dg."""
    from torch.nn.attention.flex_attention import flex_attention

    at_query = g.float().transpose(1, 2).cumsum(-1)  # U [B, H, T]
    at_key = at_query.clone()  # a second copy: one index per captured tensor (module docstring)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (at_query[b, h, q_idx] - at_key[b, h, kv_idx])

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


def window_flex_attention(q, k, v, block_mask):
    """Sliding-window attention without gate through FlexAttention; q, k, v [B, H, T, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask)


def compiled(fn):
    """fn compiled for fixed shapes, in one graph (a graph break would time eager pieces)."""
    return torch.compile(fn, dynamic=False, fullgraph=True)


def to_heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> a contiguous [B, H, T, D] leaf with x's requires_grad (the peers' own
    copy of the same values)."""
    return x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)
