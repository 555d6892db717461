"""Decoding cache of one NSA layer (docs/nsa.md, "Decoding").

A new token of an NSA layer reads three things:

* the sliding branch: the last w keys and values and their decays, exactly what a GatedFWA
  layer keeps. :attr:`NSALayerCache.window` is a :class:`WindowLayerCache` of w slots
  (gatedfwa/ops/decode/cache.py), served by the window decode op. O(w) memory.
* the selected branch: the keys and values of any block the token selects, i.e. of every
  token so far. :attr:`NSALayerCache.kept` is an unbounded (window_size=None)
  WindowLayerCache: token at stream position p in slot p, growing with the sequence (capacity
  doubled when full). NSA keeps all keys; memory grows with T.
* the compressed branch: the mean of every complete block of ``block_size`` keys (values).
  ``key_summaries`` / ``value_summaries`` [B, H, S, D] float32 hold them, block c of a row at
  index c (counted from the row's first real token); one is appended when a row's block
  completes, computed once from the block's kept keys, never recomputed.

Left padding (batched prompts of different lengths): the real tokens of row b are the last
token_counts[b] of the stream, so row b's token of rank r (0 for its first real token) sits
at stream position seen_tokens - token_counts[b] + r, and its blocks are counted from there,
as the parallel path counts them from each packed sequence's start.

Memory per token and layer: 2 H D values of the model's dtype (kept keys and values) plus
2 H D / block_size float32 (summaries); the window cache adds a constant 2 H w D values and
HQ w float32 decays.
"""

from __future__ import annotations

import torch

from gatedfwa.ops.common.validation import check_positive_int
from gatedfwa.ops.decode import WindowLayerCache

__all__ = ["NSALayerCache"]

_INITIAL_SUMMARY_CAPACITY = 16


class NSALayerCache:
    """Decoding cache of one NSA layer: window ring buffer, every key/value, block summaries.

    Args:
        window_size: the sliding branch's window w (an int >= 1), or None (full causal).
        block_size: tokens per block (summaries and selection), an int >= 1.

    The interface the layers and the model use is that of WindowLayerCache: ``prefill``,
    ``seen_tokens``, ``holds_tokens``, ``token_counts``, ``extra_state``,
    ``set_extra_state``, ``reset``, ``reorder``,
    ``memory_bytes``, ``tensors``. New tokens go in through
    gatedfwa.ops.nsa.decode.decode_nsa_attention.
    """

    def __init__(self, window_size: int | None, block_size: int):
        check_positive_int("block_size", block_size)
        self.window = WindowLayerCache(window_size)
        self.kept = WindowLayerCache(None)
        self.block_size = block_size
        self.key_summaries: torch.Tensor | None = None
        self.value_summaries: torch.Tensor | None = None
        self.extra_state: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- state

    @property
    def window_size(self) -> int | None:
        return self.window.window_size

    @property
    def seen_tokens(self) -> int:
        """Tokens written so far, padding included: the stream position of the next token."""
        return self.kept.seen_tokens

    @property
    def holds_tokens(self) -> bool:
        """True once a prompt was written: the next input is decoded against the cache."""
        return self.seen_tokens > 0

    @property
    def token_counts(self) -> torch.Tensor | None:
        """[B] int64: real tokens of each row so far."""
        return self.kept.token_counts

    def set_extra_state(self, name: str, value: torch.Tensor) -> None:
        """Keep a copy of value as extra_state[name] (the layer's own state, e.g. token shift)."""
        self.extra_state[name] = value.clone()

    def get_seq_length(self) -> int:
        return self.seen_tokens

    @property
    def num_summaries(self) -> int:
        """Summary slots any row may have filled: seen_tokens // block_size (a row with padding
        has fewer; its later slots are zero and masked by the readers)."""
        return self.seen_tokens // self.block_size

    def reset(self) -> None:
        """Forget every token (buffers kept); extra_state is cleared."""
        self.window.reset()
        self.kept.reset()
        self.extra_state = {}
        if self.key_summaries is not None:
            self.key_summaries.zero_()
            self.value_summaries.zero_()

    def memory_bytes(self) -> int:
        """Bytes held by every tensor of this cache (both inner caches, summaries, extra_state)."""
        own = [self.key_summaries, self.value_summaries, *self.extra_state.values()]
        return (self.window.memory_bytes() + self.kept.memory_bytes()
                + sum(t.numel() * t.element_size() for t in own if t is not None))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the cache by name (for inspection and tests)."""
        named = {f"window.{k}": v for k, v in self.window.tensors().items()}
        named.update({f"kept.{k}": v for k, v in self.kept.tensors().items()})
        named.update({"key_summaries": self.key_summaries, "value_summaries": self.value_summaries})
        named.update({f"extra_state.{k}": v for k, v in self.extra_state.items()})
        return {k: v for k, v in named.items() if v is not None}

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep rows ``batch_indices`` (beam search reordering, dropping finished rows)."""
        self.window.reorder(batch_indices)
        self.kept.reorder(batch_indices)
        if self.key_summaries is not None:
            index = batch_indices.to(self.key_summaries.device, torch.long)
            self.key_summaries = self.key_summaries.index_select(0, index)
            self.value_summaries = self.value_summaries.index_select(0, index)
        self.extra_state = {k: v.index_select(0, batch_indices.to(v.device, torch.long))
                            for k, v in self.extra_state.items()}

    # ---------------------------------------------------------------- writing

    def prefill(self, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, num_q_heads: int | None = None) -> None:
        """Fill an empty cache from a prompt processed by the parallel path.

        Args:
            k, v: [B, T, H, D] the prompt's keys and values (after rotary, norms, token shift).
            g: [B, T, HQ] log gates of the sliding branch (<= 0), or None (plain window).
            attention_mask: [B, T] (1 = token, 0 = padding), left-padded; None = no padding.
            num_q_heads: HQ when g is None (defaults to H).
        """
        hq = g.shape[2] if isinstance(g, torch.Tensor) and g.dim() == 3 else (num_q_heads or k.shape[2])
        self.window.prefill(k, v, g, attention_mask=attention_mask, num_q_heads=hq)  # checks everything
        self.kept.prefill(k, v, None, attention_mask=attention_mask, num_q_heads=hq)
        batch, seqlen, heads, head_dim = k.shape
        self._allocate_summaries(batch, heads, head_dim, k.device)
        count = self.num_summaries
        if count == 0:
            return
        # Block c of row b: stream positions pad_b + c * BS + (0 .. BS - 1), pad_b the row's
        # left padding. Rows with fewer complete blocks gather (clamped) garbage, zeroed below.
        counts = self.token_counts
        pads = seqlen - counts  # [B]
        block = torch.arange(count, device=k.device)
        positions = pads[:, None, None] + block[None, :, None] * self.block_size \
            + torch.arange(self.block_size, device=k.device)  # [B, count, BS]
        positions = positions.clamp(max=seqlen - 1).flatten(1)
        complete = (block[None, :] < (counts // self.block_size)[:, None])[:, None, :, None]  # [B, 1, count, 1]
        for x, summaries in ((k, self.key_summaries), (v, self.value_summaries)):
            rows = torch.gather(x, 1, positions[:, :, None, None].expand(-1, -1, heads, head_dim))
            means = rows.float().unflatten(1, (count, self.block_size)).mean(dim=2).transpose(1, 2)  # [B, H, count, D]
            summaries[:, :, :count] = torch.where(complete, means, 0.0)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Keep one new token per row (k_new/v_new [B, 1, H, D], all rows real), and append the
        summary of every row's block that it completes. The window cache is written by the
        window decode op, not here."""
        if k_new.shape[1] != 1:
            raise ValueError(f"NSALayerCache.append takes one token per row, got k_new of shape {list(k_new.shape)}")
        self.kept.append(k_new, v_new, None)
        batch, _, heads, head_dim = k_new.shape
        if self.key_summaries is None:
            self._allocate_summaries(batch, heads, head_dim, k_new.device)
        if self.seen_tokens < self.block_size:
            return  # no row can have a complete block yet
        self._ensure_summary_capacity(self.num_summaries)
        # A row completes a block when its count is a multiple of BS; that block is then the
        # last BS stream positions (all real: rows hold >= BS real tokens, padding at the left).
        # Written for every row, the old value kept where nothing completes: no host sync.
        counts = self.token_counts
        completes = (counts % self.block_size == 0) & (counts > 0)
        index = (counts // self.block_size - 1).clamp(min=0)[:, None, None, None].expand(-1, heads, 1, head_dim)
        last = self.seen_tokens - self.block_size
        for store, summaries in ((self.kept.keys, self.key_summaries), (self.kept.values, self.value_summaries)):
            mean = store[:, :, last:self.seen_tokens].float().mean(dim=2, keepdim=True)  # [B, H, 1, D]
            old = torch.gather(summaries, 2, index)
            summaries.scatter_(2, index, torch.where(completes[:, None, None, None], mean, old))

    # ---------------------------------------------------------------- helpers

    def _allocate_summaries(self, batch: int, heads: int, head_dim: int, device) -> None:
        capacity = max(_INITIAL_SUMMARY_CAPACITY, self.num_summaries)
        shape = (batch, heads, capacity, head_dim)
        self.key_summaries = torch.zeros(shape, dtype=torch.float32, device=device)
        self.value_summaries = torch.zeros(shape, dtype=torch.float32, device=device)

    def _ensure_summary_capacity(self, needed: int) -> None:
        """Double the summary buffers until ``needed`` fit."""
        capacity = self.key_summaries.shape[2]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        grow = capacity - self.key_summaries.shape[2]
        pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], grow, t.shape[3])], dim=2)  # noqa: E731
        self.key_summaries = pad(self.key_summaries)
        self.value_summaries = pad(self.value_summaries)
