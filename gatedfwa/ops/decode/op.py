"""Decoding against a window cache: L new tokens (L = 1, or a few for speculative or
chunked decoding) attend to the cached window and to themselves, causally.

New token i (0 <= i < L) sits at stream position p_i = p0 + i, where p0 = cache.seen_tokens.
It sees

* a cached key j (position pos_j, valid: pos_j >= 0) when p_i - pos_j < w, with bias
      U_{p_i} - U_j = decay_j + G_i,        G_i = g_0 + ... + g_i  (the new gates, inclusive)
  where decay_j = U_{p0-1} - U_j is what the cache holds. Both terms are <= 0: the sum has
  no cancellation.
* a new key m <= i with i - m < w, with bias G_i - G_m = g_{m+1} + ... + g_i.

The op reads the cache as it was before the step (the new tokens come from the arguments),
computes the output, then writes the new tokens into the cache (ring slots p % W) and adds
the L gates to every cached decay. Reading before writing is what lets a ring of exactly w
slots serve L > 1: a new token's slot holds a token that some earlier new query may still
need.

Two implementations:
* torch_path.py, :func:`decode_attention_torch`: plain PyTorch, float32 math (any device).
* kernels.py, :func:`decode_attention_triton`: one Triton program per (batch row, key/value head, slot
  split) serves every query head of that key/value head and every new token, so the cached
  keys and values are read once per step. At small batch the slots are split over several
  programs (flash-decoding); the last of them to finish merges their partial softmax
  results, in the same launch. The kernel also adds the new gates to the cached decays it
  reads, saving a pass over them.
:func:`decode_gated_window_attention`, here, validates, dispatches (gatedfwa/ops/backend.py)
and updates the cache.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.decode.cache import WindowLayerCache
from gatedfwa.ops.decode.torch_path import decode_attention_torch
from gatedfwa.ops.common.triton_support import triton
from gatedfwa.ops.common.validation import check_attention_tensor, check_log_gate_values, check_scale, format_shape

__all__ = ["MAX_DECODE_LENGTH", "decode_gated_window_attention"]

MAX_DECODE_LENGTH = 64
"""Most new tokens one decode call accepts; longer chunks belong to the parallel path."""


# ======================================================================================
# Validation and dispatch
# ======================================================================================


def check_decode_args(q, k_new, v_new, g_new, cache, scale) -> None:
    """q [B, L, HQ, D], k_new/v_new [B, L, H, D], g_new [B, L, HQ] or None, 1 <= L <=
    MAX_DECODE_LENGTH, all consistent with each other and with the cache."""
    if not isinstance(cache, WindowLayerCache):
        raise TypeError(f"cache must be a gatedfwa.WindowLayerCache, got {type(cache).__name__}")
    check_attention_tensor("q", q, "[batch, new_tokens, query_heads, head_dim]")
    batch, length, num_q_heads, head_dim = q.shape
    if not 1 <= length <= MAX_DECODE_LENGTH:
        raise ValueError(
            f"q must hold between 1 and {MAX_DECODE_LENGTH} new tokens (dimension 1), got {length}; "
            "use gated_window_attention and cache.prefill for longer chunks"
        )
    cache.check_step(k_new, v_new, g_new, num_q_heads, "k_new", "v_new", "g_new")
    if k_new.shape[0] != batch or k_new.shape[1] != length:
        raise ValueError(f"k_new must agree with q in batch and new_tokens, got q {format_shape(q)} and k_new {format_shape(k_new)}")
    if k_new.shape[3] != head_dim:
        raise ValueError(f"k_new must have q's head_dim {head_dim}, got {k_new.shape[3]}")
    if num_q_heads % k_new.shape[2] != 0:
        raise ValueError(
            f"the number of query heads ({num_q_heads}) must be a multiple of the number of "
            f"key/value heads ({k_new.shape[2]})"
        )
    if k_new.dtype != q.dtype:
        raise TypeError(f"k_new and v_new must have q's dtype {q.dtype}, got {k_new.dtype}")
    if k_new.device != q.device:
        raise ValueError(f"k_new and v_new must be on q's device {q.device}, got {k_new.device}")
    check_scale(scale)
    check_log_gate_values(g_new, "g_new")


def decode_gated_window_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    g_new: torch.Tensor | None,
    cache: WindowLayerCache,
    scale: float | None = None,
) -> torch.Tensor:
    """One decoding step of gated window attention; appends the new tokens to ``cache``.

    Args:
        q: [B, L, HQ, D] queries of the L new tokens (1 <= L <= MAX_DECODE_LENGTH).
        k_new, v_new: [B, L, H, D] their keys and values (HQ % H == 0), the cache's dtype.
        g_new: [B, L, HQ] their log gates (<= 0), or None for a layer without gate (the
            cache must have been filled the same way).
        cache: the layer's WindowLayerCache (its window is the layer's window). An empty,
            unallocated cache is allocated here with these shapes.
        scale: logit scale, default D ** -0.5.

    Returns:
        o [B, L, HQ, D] in q's dtype: exactly what gated_window_attention would give these
        L tokens at the end of the whole sequence (padding slots never attended).
    """
    check_decode_args(q, k_new, v_new, g_new, cache, scale)
    batch, _, num_q_heads, head_dim = q.shape
    if not cache.is_allocated:
        cache.allocate(batch, k_new.shape[2], num_q_heads, head_dim, k_new.dtype, k_new.device, g_new is not None)
    scale = float(head_dim**-0.5 if scale is None else scale)
    if select_backend(q.device) == "triton" and triton is not None:
        from gatedfwa.ops.decode.kernels import decode_attention_triton

        o = decode_attention_triton(q, k_new, v_new, g_new, cache, scale, update_decays=True)
        cache.append(k_new, v_new, g_new, shift_decays=False)
    else:
        o = decode_attention_torch(q, k_new, v_new, g_new, cache, scale)
        cache.append(k_new, v_new, g_new, shift_decays=True)
    return o
