"""The decode step in plain PyTorch (float32 math, any device): the path every device without
Triton takes, and what the Triton kernel (kernels.py) is tested against. op.py has the math;
naive.py the float64 oracle both are tested against."""

from __future__ import annotations

import torch

from gatedfwa.ops.decode.cache import WindowLayerCache

__all__ = ["decode_attention_torch"]


def decode_attention_torch(q, k_new, v_new, g_new, cache: WindowLayerCache, scale: float,
                           first_position: int | torch.Tensor | None = None) -> torch.Tensor:
    """Output of the L new tokens against the cache as it is (nothing is written).
    Computes in float32; returns o [B, L, HQ, D] in q's dtype.

    ``first_position`` is the stream position of the first new token, default
    cache.seen_tokens; the static cache passes its device tensor (static_cache.py), so that
    nothing here depends on a host value that changes from step to step."""
    batch, length, num_q_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[2]
    group = num_q_heads // num_kv_heads
    used = cache.slots_in_use
    first_position = cache.seen_tokens if first_position is None else first_position
    f32 = torch.float32
    device = q.device
    queries = q.to(f32).view(batch, length, num_kv_heads, group, head_dim)

    # Logits [B, H, group, L, keys]: cached slots first, then the new tokens.
    cached = torch.einsum("blhgd,bhnd->bhgln", queries, cache.keys[:, :, :used].to(f32)) * scale
    fresh = torch.einsum("blhgd,bmhd->bhglm", queries, k_new.to(f32)) * scale

    new_index = torch.arange(length, device=device)
    query_position = first_position + new_index  # [L]
    key_position = cache.positions[:, :used]  # [B, used]
    cached_visible = (key_position >= 0)[:, None, :].expand(batch, length, used)
    distance_new = new_index[:, None] - new_index[None, :]
    fresh_visible = distance_new >= 0
    if cache.window_size is not None:
        cached_visible = cached_visible & (query_position[None, :, None] - key_position[:, None, :] < cache.window_size)
        fresh_visible = fresh_visible & (distance_new < cache.window_size)

    if g_new is not None:
        gates = g_new.to(f32)  # [B, L, HQ]
        inclusive = gates.cumsum(1).permute(0, 2, 1).reshape(batch, num_kv_heads, group, length, 1)
        decays = cache.decays[:, :, :used].reshape(batch, num_kv_heads, group, 1, used)
        cached = cached + (decays + inclusive)
        # Bias between new tokens i >= m: g_{m+1} + ... + g_i, summed term by term.
        k_index = new_index
        between = ((k_index[None, None, :] > new_index[None, :, None])
                   & (k_index[None, None, :] <= new_index[:, None, None])).to(f32)  # [i, m, k]
        bias = torch.einsum("imk,bkq->bqim", between, gates)
        fresh = fresh + bias.reshape(batch, num_kv_heads, group, length, length)

    cached = cached.masked_fill(~cached_visible[:, None, None], float("-inf"))
    fresh = fresh.masked_fill(~fresh_visible, float("-inf"))
    # Every new token sees itself, so each row has a finite maximum.
    probs = torch.softmax(torch.cat([cached, fresh], dim=-1), dim=-1)
    out = torch.einsum("bhgln,bhnd->blhgd", probs[..., :used], cache.values[:, :, :used].to(f32))
    out = out + torch.einsum("bhglm,bmhd->blhgd", probs[..., used:], v_new.to(f32))
    return out.reshape(batch, length, num_q_heads, head_dim).to(q.dtype)
