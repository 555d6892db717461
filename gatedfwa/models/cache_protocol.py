"""What the model and generation call on a decoding cache: the contract an attention kind's
cache factory (gatedfwa/attention_kinds.py) must meet.

A model's cache (``model.new_cache()``: a gatedfwa.WindowCache; ``model.new_static_cache()``:
a StaticWindowCache) holds one :class:`LayerCache` per layer, made by the layer's kind.
GatedFWAModel.forward reads ``holds_tokens`` (prompt or decoding step?) and the first layer's
``token_counts`` (the rotary position of each row's next token); generate() and the
container read ``seen_tokens`` / ``get_seq_length``, and call ``reorder`` (beam search),
``reset`` and ``memory_bytes``. Everything else passes between a layer and its own cache:
GatedFWAttention also calls ``prefill``, ``extra_state`` and ``set_extra_state`` and hands
the cache to the decode ops (which want a WindowLayerCache); NSAttention hands its
NSALayerCache to gatedfwa.ops.nsa.decode_nsa_attention.

Implemented by gatedfwa/ops/decode/cache.py WindowLayerCache, gatedfwa/ops/decode/static_cache.py
StaticWindowLayerCache and gatedfwa/ops/nsa/cache.py NSALayerCache (tests/models/test_attention_kinds.py
checks them).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["LayerCache", "ModelCache"]


@runtime_checkable
class LayerCache(Protocol):
    """One layer's decoding cache (B rows)."""

    @property
    def seen_tokens(self) -> int:
        """Tokens written so far, left padding included: the stream position of the next token."""

    @property
    def holds_tokens(self) -> bool:
        """True once a prompt was written: the next input is decoded against the cache. A
        cache meant for compiled decoding answers from a host flag (no device read)."""

    @property
    def token_counts(self) -> torch.Tensor | None:
        """[B] int64: the real tokens of each row so far (None before the first prompt)."""

    def get_seq_length(self) -> int:
        """seen_tokens."""

    def reset(self) -> None:
        """Forget every token; the cache then takes a new prompt."""

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep rows ``batch_indices`` [B'] int64, in that order (beam search)."""

    def memory_bytes(self) -> int:
        """Bytes held by the cache's tensors."""


@runtime_checkable
class ModelCache(Protocol):
    """A model's decoding cache: one LayerCache per layer."""

    def __len__(self) -> int:
        """The number of layers."""

    def __getitem__(self, layer_idx: int) -> LayerCache:
        """Layer ``layer_idx``'s cache."""

    @property
    def holds_tokens(self) -> bool:
        """True once a prompt was written (the model then decodes its input)."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far, padding included."""

    def reset(self) -> None:
        """Reset every layer."""

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Reorder every layer's rows (beam search)."""

    def memory_bytes(self) -> int:
        """Bytes held by every layer."""
