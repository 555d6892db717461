"""NSAttention: the attention layer of the NSA kinds ("nsa", "nsa-gatedfwa").

    x [B, T, C]
      -> q, k, v, token shift, QK norm, rotary: as GatedFWAttention (gatedfwa/layers/attention.py)
      -> branch gates g_cmp, g_slc, g_swa = sigmoid(x W_branch)   [B, T, HQ] each
      -> the GatedFWA log gates g of the sliding branch ("nsa-gatedfwa"; "nsa": none)
      -> nsa_attention(q, k, v, g, g_cmp, g_slc, g_swa, block_size, block_counts, window_size)
      -> output gate (optional), o W_o [B, T, C]

NSA (arXiv 2502.11089) mixes three attention branches per query head with learned gates:
attention over mean-pooled block summaries (compressed), over the blocks the compressed
scores select (selected), and over the last window_size keys (sliding; GatedFWA's gated
window for "nsa-gatedfwa"). docs/nsa.md states every rule.

Decoding uses an NSALayerCache (gatedfwa/ops/nsa/cache.py): the sliding branch's window ring
buffer, every key and value for the selection, and the block summaries.
"""

from __future__ import annotations

import torch
from torch import nn

from gatedfwa.layers.attention import GatedFWAttention
from gatedfwa.ops.nsa import NSALayerCache, decode_nsa_attention, nsa_attention

__all__ = ["NSAttention"]


class NSAttention(GatedFWAttention):
    """Native Sparse Attention layer whose sliding branch is (gated) window attention.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim, rope_theta, qk_norm, output_gate,
        token_shift, norm_eps, gate_init_range, layer_idx, gate: as GatedFWAttention.
        window_size: keys of the sliding branch, the query included (None: full causal).
        use_gate: GatedFWA log gates (of the gate named by ``gate``) in the sliding branch
            ("nsa-gatedfwa"); False: plain sliding window ("nsa").
        block_size: tokens per block, for the summaries and the selection.
        block_counts: blocks each query selects (block 0 and its own block among them).

    Parameters: those of GatedFWAttention, plus branch_gate_proj.weight [3 HQ, C] (rows for
    g_cmp, then g_slc, then g_swa; no bias: every branch starts at a gate of about 1/2).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | None = 512,
        use_gate: bool = True,
        block_size: int = 64,
        block_counts: int = 16,
        **kwargs,
    ):
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, window_size=window_size, use_gate=use_gate,
                         **kwargs)
        for name, value in (("block_size", block_size), ("block_counts", block_counts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.block_size = block_size
        self.block_counts = block_counts
        self.branch_gate_proj = nn.Linear(hidden_size, 3 * num_heads, bias=False)

    def new_cache(self) -> NSALayerCache:
        """An empty decoding cache for this layer."""
        return NSALayerCache(self.window_size, self.block_size)

    def branch_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> (g_cmp, g_slc, g_swa), each [B, T, HQ] in (0, 1), x's dtype."""
        gates = torch.sigmoid(self.branch_gate_proj(x)).unflatten(-1, (3, self.num_heads))
        return gates.unbind(dim=-2)

    def attend(self, q, k, v, x, cu_seqlens, gate_pre=None):
        return self.attend_with_gates(q, k, v, x, cu_seqlens, gate_pre)[0]

    def attend_with_gates(self, q, k, v, x, cu_seqlens, gate_pre=None):
        g = self._gates_from_projection(gate_pre)
        # No sequence here has more than ceil(T / block_size) blocks: asking for more selects
        # the same blocks (every candidate) while the op would still reserve block_counts
        # slots per query (the PyTorch path gathers block_counts * block_size keys each).
        block_counts = min(self.block_counts, max(1, -(-q.shape[1] // self.block_size)))
        o = nsa_attention(q, k, v, g, *self.branch_gates(x), block_size=self.block_size,
                          block_counts=block_counts, window_size=self.window_size, scale=self.scale,
                          cu_seqlens=cu_seqlens)
        return o, g

    def attend_cached(self, q, k, v, x, cache):
        if not isinstance(cache, NSALayerCache):
            raise TypeError(f"an NSA layer decodes with an NSALayerCache (layer.new_cache()), got {type(cache).__name__}")
        g = self.log_gates(x) if self.use_gate else None
        return decode_nsa_attention(q, k, v, g, *self.branch_gates(x), cache, block_counts=self.block_counts,
                                    scale=self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, block_counts={self.block_counts}"
