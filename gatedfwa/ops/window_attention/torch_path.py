"""Gated sliding-window attention in plain PyTorch: the path every device without Triton takes
(and, with GATEDFWA_BACKEND=torch or use_backend("torch"), any device).

    o_t = sum_{j in window(t)} softmax_j( scale * q_t . k_j + (U_t - U_j) ) v_j
    U_t = g_1 + ... + g_t        (summed per sequence, per query head)
    window(t) = { j : bos <= j <= t and t - j < w }

Queries may be fewer than keys (T_q <= T_k, per sequence with varlen): they align to the
end, query i sitting at key position T_k - T_q + i, and t above is that key position. The
gates g cover the key positions (docs/math.md).

:func:`chunked_gated_window_attention` splits queries into chunks and gives each chunk only
the keys its window reaches, so memory is O(T * (w + chunk)) instead of O(T^2). Gate sums are
taken locally inside each chunk's key span, never as a global cumulative sum. It is
differentiable through autograd. naive.py holds the quadratic float64 oracle it is tested
against.

Shapes, everywhere in this package:
    q [B, T, HQ, D], k and v [B, T, H, D] with HQ % H == 0, g [B, T, HQ] (log gates, <= 0),
    o [B, T, HQ, D], lse [B, HQ, T] (float32, natural log).
    With cu_seqlens (int32 [N + 1]), B == 1 and the T axis packs N sequences back to back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatedfwa.ops.common.varlen import query_key_spans

__all__ = ["chunked_gated_window_attention"]


def _default_chunk(window_size: int, seqlen: int) -> int:
    """Query chunk length: about the window (score blocks stay near-square, waste small),
    clamped to [16, 128]."""
    chunk = 16
    while chunk < min(window_size, 128):
        chunk *= 2
    return min(chunk, max(16, seqlen))


def _chunked_one_sequence(q, k, v, g, window_size, scale, chunk):
    """One sequence. q [B, n_q, HQ, D], k/v [B, n, H, D], g [B, n, HQ] or None, float32, with
    n_q <= n: query i sits at key position offset + i, offset = n - n_q.

    Query chunk c covers rows [c*C, (c+1)*C); its keys are the span
    [offset + c*C - (w-1), offset + (c+1)*C), obtained by left-padding K/V/g with w-1 zero
    rows, dropping the first `offset` positions and unfolding. Padding rows are masked.
    """
    batch, n, num_q_heads, head_dim = q.shape
    offset = k.shape[1] - n  # from here on n counts the queries
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    history = window_size - 1  # keys before the chunk that its first row can still see
    num_chunks = -(-n // chunk)
    padded = num_chunks * chunk
    span = chunk + history

    def pad_time(x, left, right):
        # x [B, n, ...] -> [B, left + n + right, ...]
        pad = [0, 0] * (x.dim() - 2) + [left, right]
        return F.pad(x, pad)

    def key_spans(x):
        # x [B, offset + n, ...]: chunk c's span starts at padded position offset + c*C.
        return pad_time(x, history, padded - n)[:, offset:].unfold(1, span, chunk)

    q_chunks = pad_time(q, 0, padded - n).view(batch, num_chunks, chunk, num_q_heads, head_dim)
    # unfold(dim=1, size=span, step=chunk) -> [B, N, H, D, span]
    k_spans = key_spans(k).permute(0, 1, 4, 2, 3)
    v_spans = key_spans(v).permute(0, 1, 4, 2, 3)
    # [B, N, C, HQ, D] x [B, N, S, H, D] -> scores [B, N, H, group, C, S]
    q_grouped = q_chunks.view(batch, num_chunks, chunk, num_kv_heads, group, head_dim)
    scores = torch.einsum("bncihd,bnsid->bnihcs", q_grouped, k_spans) * scale
    if g is not None:
        # Decay bias from a cumulative sum local to each span: magnitudes stay bounded by
        # the span, never by the sequence length.
        g_spans = key_spans(g)  # [B, N, HQ, S]
        local = torch.cumsum(g_spans, dim=-1).view(batch, num_chunks, num_kv_heads, group, span)
        query_part = local[..., history:]  # rows of the chunk sit at span offsets history + i
        scores = scores + (query_part[..., :, None] - local[..., None, :])
    rows = torch.arange(chunk, device=q.device)[:, None] + history  # span offset of each query
    cols = torch.arange(span, device=q.device)[None, :]
    distance = rows - cols
    visible = (distance >= 0) & (distance < window_size)
    # Keys that fall in the left padding (absolute position < 0) are invisible.
    absolute_key = offset + torch.arange(num_chunks, device=q.device)[:, None, None] * chunk + cols[None] - history
    visible = visible[None] & (absolute_key >= 0)  # [N, C, S]
    visible = visible[None, :, None, None]  # [1, N, 1, 1, C, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])  # every real row sees itself: lse finite
    out = torch.einsum("bnihcs,bnsid->bncihd", probs, v_spans)
    out = out.reshape(batch, padded, num_q_heads, head_dim)[:, :n]
    lse = lse.permute(0, 2, 3, 1, 4).reshape(batch, num_q_heads, padded)[..., :n]
    return out, lse


def chunked_gated_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    window_size: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory O(T * (w + chunk)); differentiable; computes in float32 (float64 for float64
    inputs), returns o in q's dtype and lse [B, HQ, T_q] float32. window_size None (full
    causal) uses w = T_k. q may be shorter than k (module docstring); cu_seqlens delimits
    k's sequences, and q's too unless cu_seqlens_q is given.
    """
    batch, seqlen, num_q_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    dtype = q.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    gf = None if g is None else g.to(compute)

    def run(qs, ks, vs, gs, n):
        w = n if window_size is None else min(window_size, n)
        chunk = chunk_size or _default_chunk(w, qs.shape[1])
        return _chunked_one_sequence(qs, ks, vs, gs, max(w, 1), scale, chunk)

    if cu_seqlens is None:
        if seqlen == 0:
            return q.new_zeros(q.shape), q.new_zeros((batch, num_q_heads, 0), dtype=torch.float32)
        o, lse = run(qf, kf, vf, gf, k.shape[1])
        return o.to(dtype), lse.float()

    outs, lses = [], []
    for _, (q_start, q_end), (k_start, k_end) in query_key_spans(cu_seqlens_q, cu_seqlens, batch, seqlen, k.shape[1]):
        if q_end == q_start:
            continue
        keys = slice(k_start, k_end)
        o, lse = run(qf[:, q_start:q_end], kf[:, keys], vf[:, keys], None if gf is None else gf[:, keys],
                     k_end - k_start)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros((batch, num_q_heads, seqlen), dtype=torch.float32)
    return torch.cat(outs, dim=1).to(dtype), torch.cat(lses, dim=2).float()
