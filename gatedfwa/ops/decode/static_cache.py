"""Fixed-shape decoding cache whose position lives on the device, so that a whole decode step
can be captured and replayed as one CUDA graph (torch.compile(mode="reduce-overhead")).

:class:`WindowLayerCache` (cache.py) keeps the stream position of the next token as a Python
int and scans only the slots written so far: every step then depends on a host value, which
a captured graph cannot follow. :class:`StaticWindowLayerCache` keeps instead

    next_position   int64 0-d tensor on the cache's device: the stream position of the next
                    token (what seen_tokens counts on the host in cache.py)

and never changes a tensor's shape or address after allocation:

    keys, values    [B, H, W, D]   W = window_size, or max_length for a layer without window
    decays          [B, HQ, W]     float32 (gated layers)
    positions       [B, W]         int64, -1 = empty or padding
    token_counts    [B]            int64, real tokens per row (the rotary position)
    split_counters  [B, HQ]        int32, zero between steps (the decode kernel's split count)

A decode step (:func:`gatedfwa.ops.decode.static_op.decode_static_step`) reads every one of
the W slots, masking the empty ones through ``positions``, and writes its tokens at slots
``(next_position + i) % W``, computed on the device; no host value changes, so the compiled
step needs no guard on the position. A layer without window writes token t at slot t (no
modulo): a stream longer than max_length then fails loudly (an index error, a device-side
assert on CUDA) instead of silently forgetting the oldest tokens.

Prefilling a prompt and appending a chunk (eager, outside the graph) reuse cache.py's code;
they read next_position back to the host, which costs one synchronisation per call.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gatedfwa.ops.common.validation import check_positive_int
from gatedfwa.ops.decode.cache import WindowCache, WindowLayerCache

__all__ = ["StaticWindowLayerCache", "StaticWindowCache"]


def _mark_static(tensor: torch.Tensor) -> None:
    """Tell torch.compile that the tensor keeps its address across calls, so a CUDA graph may
    read and write it in place instead of copying it in on every replay."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)


class StaticWindowLayerCache(WindowLayerCache):
    """One layer's fixed-shape ring buffer with a device-side position.

    Args:
        window_size: the layer's window w (int >= 1), or None for a layer without window.
        max_length: slots of a layer without window (the longest stream it can hold,
            prompt included); ignored for a bounded window, whose ring has w slots.
    """

    def __init__(self, window_size: int | None, max_length: int | None = None):
        self.next_position: torch.Tensor | None = None
        super().__init__(window_size)
        if window_size is None:
            if max_length is None:
                raise ValueError("max_length (an int >= 1, the longest stream the cache holds) is required for a "
                                 "layer without window")
            check_positive_int("max_length", max_length)
        self.max_length = max_length
        self.prefilled = False

    @property
    def static_capacity(self) -> int:
        return self.window_size if self.window_size is not None else self.max_length

    # The host counter of cache.py is the device position here. Reading it synchronises with
    # the device: only prefill, append and get_seq_length do, never the decode step.
    @property
    def seen_tokens(self) -> int:
        return 0 if self.next_position is None else int(self.next_position)

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        if self.next_position is not None:
            self.next_position.fill_(value)

    @property
    def holds_tokens(self) -> bool:
        """A host flag, set by prefill and cleared by reset: it does not change while
        decoding, so a compiled step does not recompile on it."""
        return self.prefilled

    @property
    def slots_in_use(self) -> int:
        return self.capacity

    def allocate(self, batch_size, num_kv_heads, num_q_heads, head_dim, dtype, device, gated, capacity=None) -> None:
        super().allocate(batch_size, num_kv_heads, num_q_heads, head_dim, dtype, device, gated,
                         capacity=self.static_capacity)
        self.next_position = torch.zeros((), dtype=torch.int64, device=device)
        self.prefilled = False
        for tensor in (self.keys, self.values, self.decays, self.positions, self.token_counts, self.split_counters,
                       self.next_position):
            if tensor is not None:
                _mark_static(tensor)

    def reset(self) -> None:
        super().reset()
        self.prefilled = False

    def prefill(self, k, v, g=None, attention_mask=None, num_q_heads=None) -> None:
        """As WindowLayerCache.prefill; a prompt longer than max_length (no window) is refused."""
        if self.window_size is None and k.dim() == 4 and k.shape[1] > self.max_length:
            raise ValueError(f"the prompt has {k.shape[1]} tokens, more than the cache's max_length {self.max_length}")
        super().prefill(k, v, g, attention_mask=attention_mask, num_q_heads=num_q_heads)
        self.prefilled = True

    def append(self, k_new, v_new, g_new, shift_decays: bool = True) -> None:
        super().append(k_new, v_new, g_new, shift_decays=shift_decays)
        self.prefilled = True

    def set_extra_state(self, name: str, value: torch.Tensor) -> None:
        """Copy into the tensor already kept under ``name`` (its address stays, as a CUDA
        graph needs), or keep a copy of ``value`` the first time."""
        kept = self.extra_state.get(name)
        if kept is not None and kept.shape == value.shape and kept.dtype == value.dtype:
            kept.copy_(value)
        else:
            self.extra_state[name] = value.clone()
            _mark_static(self.extra_state[name])

    def memory_bytes(self) -> int:
        extra = 0 if self.next_position is None else self.next_position.element_size()
        return super().memory_bytes() + extra

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep rows ``batch_indices`` in place (beam search): the tensors keep their
        addresses, so the batch size cannot change. The split counters are zero between
        steps and stay as they are."""
        if self.keys is None:
            return
        index = batch_indices.to(self.keys.device, torch.long)
        if index.numel() != self.batch_size:
            raise ValueError(f"a static cache keeps its batch size {self.batch_size}; got {index.numel()} rows")
        for tensor in [self.keys, self.values, self.decays, self.positions, self.token_counts,
                       *self.extra_state.values()]:
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, index))

    def _ensure_capacity(self, needed: int) -> None:
        if self.window_size is None and needed > self.capacity:
            raise ValueError(
                f"the stream would hold {needed} tokens, more than the static cache's max_length {self.capacity}"
            )


class StaticWindowCache(WindowCache):
    """A model's fixed-shape decoding cache: one :class:`StaticWindowLayerCache` per layer.

    Args:
        window_sizes: one window per layer (int, or None for a layer without window).
        max_length: slots of the layers without window (prompt plus generated tokens).
        prefill_chunk_size: the model prefills a longer prompt in chunks of this many tokens
            (memory O(window + chunk) per windowed layer); None = one parallel pass.

    ``is_compileable`` tells transformers' generate() that it may compile the model's
    forward (mode "reduce-overhead") around this cache.
    """

    is_compileable = True

    def __init__(self, window_sizes: Sequence[int | None], max_length: int | None = None,
                 prefill_chunk_size: int | None = None):
        if prefill_chunk_size is not None:
            check_positive_int("prefill_chunk_size", prefill_chunk_size)
        self.layers = [StaticWindowLayerCache(w, max_length) for w in window_sizes]
        self.max_length = max_length
        self.prefill_chunk_size = prefill_chunk_size

    @property
    def is_linear(self) -> list[bool]:
        # Read by generate(): no layer is a recurrent state (each keeps keys and values).
        return [False] * len(self.layers)

    @property
    def holds_tokens(self) -> bool:
        # len() rather than bool(): torch.compile traces the model's forward through this.
        return len(self.layers) > 0 and self.layers[0].holds_tokens
