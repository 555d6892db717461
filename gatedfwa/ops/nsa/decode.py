"""Decoding NSA against an NSALayerCache (gatedfwa/ops/nsa/cache.py): the step on the PyTorch
path, and the dispatch to the Triton kernels (decode_triton.py).

A new token of rank r in its row (r + 1 real tokens with itself, n = r + 1) computes, with
the rules of naive.py (code: rules.py):

* compressed: softmax over the summaries of its row's complete blocks c < n // BS (all of
  them: the summaries of blocks it completes included), o_cmp = 0 while there is none;
* selection: importance = those probabilities summed over the query heads of a kv head;
  block 0 and the own block r // BS always kept; the block_counts best, ties to the lower
  block number;
* selected: softmax over the kept keys of the selected blocks, ranks <= r;
* sliding: the window decode op (gatedfwa/ops/decode) on the layer's window cache.

Backends (gatedfwa/ops/backend.py, as the parallel op): "torch" (CPU, any device without
Triton) takes the tokens one at a time (the kept keys and summaries grow by one token, then it
attends), in float32. "triton" (CUDA; the interpreter in tests) writes the L new tokens to the
cache first (L <= MAX_DECODE_LENGTH at a time), then computes the compressed and selected
branches of all L as one call with fewer queries than keys (decode_triton.py), with the
parallel op's kernels. The work per token is O(T / BS) for the compressed branch and the
selection and O(block_counts * BS) for the selected branch either way.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.backend import select_backend
from gatedfwa.ops.decode import MAX_DECODE_LENGTH, decode_gated_window_attention
from gatedfwa.ops.nsa.cache import NSALayerCache
from gatedfwa.ops.nsa.rules import combine_branches
from gatedfwa.ops.common.validation import check_attention_tensor, check_gate_like, check_positive_int, check_scale

__all__ = ["decode_nsa_attention"]


def decode_nsa_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    g_new: torch.Tensor | None,
    g_cmp: torch.Tensor | None,
    g_slc: torch.Tensor | None,
    g_swa: torch.Tensor | None,
    cache: NSALayerCache,
    *,
    block_counts: int = 16,
    scale: float | None = None,
) -> torch.Tensor:
    """Decoding steps of nsa_attention; appends the new tokens to ``cache``.

    Args:
        q: [B, L, HQ, D] queries of L new tokens (all real, following the cached ones).
        k_new, v_new: [B, L, H, D] their keys and values, the cache's dtype.
        g_new: [B, L, HQ] log gates of the sliding branch, or None (as the cache was filled).
        g_cmp, g_slc, g_swa: [B, L, HQ] branch gates, or None to leave a branch out (the
            window cache is updated either way, so that it stays in step).
        cache: the layer's NSALayerCache, filled by its prefill (or empty).
        block_counts: blocks each query selects.
        scale: logit scale, default D ** -0.5.

    Returns:
        o [B, L, HQ, D] in q's dtype: what nsa_attention gives these tokens at the end of
        the whole sequence.
    """
    if not isinstance(cache, NSALayerCache):
        raise TypeError(f"cache must be a gatedfwa.ops.nsa.NSALayerCache, got {type(cache).__name__}")
    check_attention_tensor("q", q, "[batch, new_tokens, query_heads, head_dim]")
    for name, gate in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_gate_like(gate, tuple(q.shape[:3]), q.device, name=name)
    if g_cmp is None and g_slc is None and g_swa is None:
        raise ValueError("at least one of the branch gates g_cmp, g_slc, g_swa must be given")
    check_positive_int("block_counts", block_counts)
    check_scale(scale)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not cache.kept.is_allocated:  # decoding without a prompt: nothing prefilled
        cache.kept.allocate(q.shape[0], k_new.shape[2], q.shape[2], q.shape[3], k_new.dtype, k_new.device, gated=False)
    if select_backend(q.device) == "triton":
        pieces = [slice(i, min(i + MAX_DECODE_LENGTH, q.shape[1])) for i in range(0, q.shape[1], MAX_DECODE_LENGTH)]
        return torch.cat([_kernel_steps(q[:, p], k_new[:, p], v_new[:, p], *(_part(x, p) for x in (
            g_new, g_cmp, g_slc, g_swa)), cache, block_counts, scale) for p in pieces], dim=1)
    outputs = []
    for i in range(q.shape[1]):
        step = slice(i, i + 1)
        # The window op checks k_new/v_new/g_new against q and the cache, and writes the window.
        o_swa = decode_gated_window_attention(q[:, step], k_new[:, step], v_new[:, step],
                                              None if g_new is None else g_new[:, step], cache.window, scale)
        cache.append(k_new[:, step], v_new[:, step])
        query = q[:, i].float()
        branches = []
        if g_cmp is not None or g_slc is not None:
            o_cmp, probs = _compressed_step(query, cache, scale)
            if g_cmp is not None:
                branches.append((g_cmp[:, i], o_cmp))
            if g_slc is not None:
                blocks = _select_step(probs, cache, block_counts)
                branches.append((g_slc[:, i], _selected_step(query, cache, blocks, scale)))
        if g_swa is not None:
            branches.append((g_swa[:, i], o_swa[:, 0].float()))
        outputs.append(combine_branches(branches, torch.float32).to(q.dtype))
    return torch.stack(outputs, dim=1)


def _part(x: torch.Tensor | None, piece: slice) -> torch.Tensor | None:
    return None if x is None else x[:, piece]


def _kernel_steps(q, k_new, v_new, g_new, g_cmp, g_slc, g_swa, cache: NSALayerCache, block_counts: int,
                  scale: float) -> torch.Tensor:
    """The Triton path for L <= MAX_DECODE_LENGTH new tokens: the window decode op on all L,
    the tokens into the kept keys and summaries, then the compressed and selected branches as
    one fewer-queries call (decode_triton.py)."""
    from gatedfwa.ops.nsa.decode_triton import triton_decode_branches

    # The window op checks k_new/v_new/g_new against q and the cache, and writes the window.
    o_swa = decode_gated_window_attention(q, k_new, v_new, g_new, cache.window, scale)
    for i in range(q.shape[1]):
        cache.append(k_new[:, i:i + 1], v_new[:, i:i + 1])
    branches = []
    if g_cmp is not None or g_slc is not None:
        o_cmp, o_slc = triton_decode_branches(q, cache, block_counts, scale, g_cmp is not None, g_slc is not None)
        branches += [(g_cmp, o_cmp), (g_slc, o_slc)]
    if g_swa is not None:
        branches.append((g_swa, o_swa))
    return combine_branches(branches, torch.float32).to(q.dtype)


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of the visible entries; all-zero rows where none is."""
    if scores.shape[-1] == 0:  # nothing to attend to yet (no complete block)
        return scores
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, 0.0))
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total > 0, total, 1.0)


def _compressed_step(query: torch.Tensor, cache: NSALayerCache, scale: float):
    """query [B, HQ, D] float32 of the newest token -> (o_cmp [B, HQ, D], probabilities
    [B, H, G, S] over the summary slots, 0 at those not visible)."""
    batch, num_q_heads, head_dim = query.shape
    count = cache.num_summaries
    num_kv_heads = cache.kept.num_kv_heads
    grouped = query.view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [B, H, G, D]
    keys = cache.key_summaries[:, :, :count]  # [B, H, S, D]
    values = cache.value_summaries[:, :, :count]
    scores = torch.einsum("bhgd,bhsd->bhgs", grouped, keys) * scale
    complete = cache.token_counts // cache.block_size  # [B]: the row's summaries, all visible now
    visible = (torch.arange(count, device=query.device)[None, :] < complete[:, None])[:, None, None, :]
    probs = _masked_softmax(scores, visible)
    o = torch.einsum("bhgs,bhsd->bhgd", probs, values).reshape(batch, num_q_heads, head_dim)
    return o, probs


def _select_step(probs: torch.Tensor, cache: NSALayerCache, block_counts: int) -> torch.Tensor:
    """The selection rule of reference.select_blocks_from_importance for the newest token:
    probs [B, H, G, S] -> selected block numbers [B, H, K] (K = min(block_counts, blocks),
    -1 where a row has fewer candidates)."""
    batch, num_kv_heads, _, count = probs.shape
    block_size = cache.block_size
    num_blocks = -(-cache.seen_tokens // block_size)  # the most blocks any row has
    importance = probs.sum(dim=2)  # [B, H, S]
    scores = torch.full((batch, num_kv_heads, num_blocks), float("-inf"), dtype=importance.dtype,
                        device=importance.device)
    scores[..., :count] = importance
    counts = cache.token_counts[:, None]  # [B, 1]
    c = torch.arange(num_blocks, device=probs.device)[None, :]
    own = (counts - 1) // block_size
    visible = c < counts // block_size
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    always_kept = (c == 0) | (c == own)
    scores = scores.masked_fill(always_kept[:, None, :], float("inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    kept = min(block_counts, num_blocks)
    chosen = order.indices[..., :kept]
    return torch.where(order.values[..., :kept] > float("-inf"), chosen, -1)


def _selected_step(query: torch.Tensor, cache: NSALayerCache, blocks: torch.Tensor, scale: float) -> torch.Tensor:
    """query [B, HQ, D] float32, blocks [B, H, K] -> o_slc [B, HQ, D]: attention over the kept
    keys of the selected blocks (ranks <= the query's, which is the newest)."""
    batch, num_q_heads, head_dim = query.shape
    block_size = cache.block_size
    num_kv_heads = blocks.shape[1]
    counts = cache.token_counts[:, None, None, None]  # [B, 1, 1, 1]
    pads = cache.seen_tokens - counts
    rank = blocks[..., None].long() * block_size + torch.arange(block_size, device=query.device)  # [B, H, K, BS]
    visible = (blocks[..., None] >= 0) & (rank < counts)
    slots = torch.where(visible, pads + rank, 0).flatten(2)[..., None].expand(-1, -1, -1, head_dim)
    keys = torch.gather(cache.kept.keys, 2, slots).float()  # [B, H, K * BS, D]
    values = torch.gather(cache.kept.values, 2, slots).float()
    grouped = query.view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,bhkd->bhgk", grouped, keys) * scale
    probs = _masked_softmax(scores, visible.flatten(2)[:, :, None, :])
    return torch.einsum("bhgk,bhkd->bhgd", probs, values).reshape(batch, num_q_heads, head_dim)
