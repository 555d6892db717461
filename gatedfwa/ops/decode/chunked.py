"""Chunked prefill: a prompt processed chunk by chunk against the window cache, so that a
long prompt needs memory O(w + chunk) per windowed layer instead of O(prompt).

A chunk's queries see the cached window (the last w - 1 tokens before the chunk, or every
cached token for a layer without window) and the chunk itself. :func:`attend_chunk` computes
that attention with the parallel op on the keys [cached window || chunk]; the cache then
takes the chunk in (WindowLayerCache.append).

The cache keeps per slot the decay since the slot's token (decay_j = g_{j+1} + ... + g_latest),
not the gates themselves. For the parallel op the cached tokens j_0 < ... < j_{m-1} get the
gates that reproduce those sums: g'_{j_i} = decay_{j_(i-1)} - decay_{j_i}, and g'_{j_0} = 0
(no query of the chunk sees the bias up to j_0, only from it). A query p of the chunk then
gets bias decay_j + (g_first + ... + g_p) for a cached key j, as in the decode op.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.decode.cache import WindowLayerCache
from gatedfwa.ops.window_attention.op import gated_window_attention

__all__ = ["attend_chunk", "cached_window", "prefill_chunk"]


def attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                 window_size: int | None, scale: float) -> torch.Tensor:
    """Attention of a chunk's queries against [cached tokens || chunk] keys.

    Args:
        q: [B, C, HQ, D], the chunk's queries.
        k, v: [B, M + C, H, D], the M cached tokens (oldest first) then the chunk's.
        g: [B, M + C, HQ] log gates of the same tokens, or None.
        window_size, scale: as for gated_window_attention.

    Returns:
        o [B, C, HQ, D]: row c is what the whole stream's attention gives the chunk's token c.

    The queries are aligned to the end of the keys (query c sits at key position M + c), which
    is how gated_window_attention places fewer queries than keys: one call, no padded rows.
    """
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"k must hold the chunk's {q.shape[1]} tokens after the cached ones, got {k.shape[1]} keys")
    return gated_window_attention(q, k, v, g, window_size=window_size, scale=scale)


def cached_window(cache: WindowLayerCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The cached tokens a following chunk can see, oldest first: k, v [B, M, H, D] and the
    equivalent gates [B, M, HQ] float32 (None for an ungated cache); M = min(w - 1, tokens
    written), or every token written for a cache without window. Reads the host position
    (eager prefill only). Refuses padding: chunked prefill takes unpadded prompts."""
    seen = cache.seen_tokens
    count = seen if cache.window_size is None else min(cache.window_size - 1, seen)
    stream = torch.arange(seen - count, seen, device=cache.keys.device)
    slots = stream % cache.capacity if cache.window_size is not None else stream
    if bool((cache.positions.index_select(1, slots) < 0).any()):
        raise ValueError("chunked prefill needs prompts without padding (attention_mask all ones)")
    keys = cache.keys.index_select(2, slots).transpose(1, 2)
    values = cache.values.index_select(2, slots).transpose(1, 2)
    if cache.decays is None:
        return keys, values, None
    decays = cache.decays.index_select(2, slots).transpose(1, 2)  # [B, M, HQ]
    # Rounding can leave a difference of two nearly equal decays a hair above 0.
    gates = (decays[:, :-1] - decays[:, 1:]).clamp(max=0.0)
    gates = torch.cat((torch.zeros_like(decays[:, :1]), gates), dim=1)
    return keys, values, gates


def prefill_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                  cache: WindowLayerCache, scale: float) -> torch.Tensor:
    """One chunk (q [B, C, HQ, D], k/v [B, C, H, D], g [B, C, HQ] or None) after the tokens
    the cache holds: returns o [B, C, HQ, D] and appends the chunk to the cache."""
    cached_k, cached_v, cached_g = cached_window(cache)
    keys = torch.cat((cached_k, k), dim=1)
    values = torch.cat((cached_v, v), dim=1)
    gates = None if g is None else torch.cat((cached_g, g.float()), dim=1)
    o = attend_chunk(q, keys, values, gates, cache.window_size, scale)
    cache.append(k, v, g, shift_decays=True)
    return o
