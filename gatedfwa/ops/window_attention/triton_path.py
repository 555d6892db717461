"""The Triton path of gated window attention, from the log gates: the chunk gate sums
(chunk_sums.py), then the kernels (forward.py, backward.py), on contiguous tensors.

op.py wraps these two functions in its custom ops (and their eager autograd.Function);
context parallelism (gatedfwa/distributed/fused.py) calls them itself, around its halo
exchange.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.triton_support import LOG2E

__all__ = ["window_attention_forward", "window_attention_backward", "natural_lse_gradient"]


def _gate_sums(g: torch.Tensor | None, q: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """The chunk-local gate sums [2, B, HQ, T_k] the kernels read, or None without g; g covers
    the key positions, cu_seqlens delimits k's sequences."""
    if g is None:
        return None
    from gatedfwa.ops.window_attention.chunk_sums import chunk_gate_sums
    from gatedfwa.ops.window_attention.launch import gate_chunk

    return chunk_gate_sums(g, gate_chunk(q.shape[-1], q.device), cu_seqlens)


def natural_lse_gradient(dlse2: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient into the natural-log lse from the one into lse2 (base 2, lse = lse2 * ln 2):
    dlse = dlse2 / ln 2."""
    return None if dlse2 is None else dlse2 * LOG2E


def window_attention_forward(q, k, v, g, window_size, scale, cu_seqlens, cu_seqlens_q=None):
    """(o [B, T_q, HQ, D] in q's dtype, lse2 [B, HQ, T_q] float32, the base-2 log-sum-exp).

    q [B, T_q, HQ, D], k and v [B, T_k, H, D], g [B, T_k, HQ] log gates or None, all
    contiguous and checked (gated_window_attention's checks); scale a float; cu_seqlens
    delimits k's sequences, cu_seqlens_q q's (None: as k's)."""
    from gatedfwa.ops.window_attention.forward import attention_forward

    return attention_forward(q, k, v, _gate_sums(g, q, cu_seqlens), window_size, scale, cu_seqlens, cu_seqlens_q)


def window_attention_backward(do, q, k, v, g, o, lse2, window_size, scale, cu_seqlens, cu_seqlens_q=None,
                              dlse2=None):
    """(dq, dk, dv, dg): the gradients of q, k, v in their dtypes and of g [B, T_k, HQ] in g's
    dtype (None without g), for the upstream gradient do [B, T_q, HQ, D] (contiguous) of o.
    o and lse2 are what window_attention_forward returned for the same arguments; dlse2
    [B, HQ, T_q] is the gradient into lse2, or None when it has none."""
    from gatedfwa.ops.window_attention.backward import attention_backward

    sums = _gate_sums(g, q, cu_seqlens)  # recomputed: one light pass over g
    dq, dk, dv, dg = attention_backward(do, q, k, v, sums, o, lse2, window_size, scale, cu_seqlens, cu_seqlens_q,
                                        dlse=natural_lse_gradient(dlse2))
    if dg is None:
        return dq, dk, dv, None
    return dq, dk, dv, dg.transpose(1, 2).to(g.dtype).contiguous()
