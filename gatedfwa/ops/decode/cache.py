"""Decoding cache: per layer, the keys and values a new token can still see, and the decay
each of them has accumulated since it was written.

A query at position p sees the keys at positions p - w + 1 .. p (the window counts the
query itself), with logit bias U_p - U_j = g_{j+1} + ... + g_p. So a layer needs to keep
only the last w tokens: a ring buffer of w slots, where token t lives in slot t % w. For
each slot it also keeps

    decay[slot] = U_latest - U_j = g_{j+1} + ... + g_latest      (float32, <= 0)

where j is the slot's token and "latest" the last token written. When a token arrives with
gate g, every slot's decay grows by g and the new token's slot starts at 0. A slot lives at
most w steps before it is overwritten, so its decay is a sum of at most w gates: its size
and its rounding error are bounded by the window, not by how many tokens were generated
(no drift after millions of steps). The global running sum U is never formed.

Attention kinds without a window ("full", "forgetting": window_size=None) need every token;
their cache grows (capacity doubles when full) and slot t holds token t.

Tensors of a :class:`WindowLayerCache` (B batch rows, H key/value heads, HQ query heads,
D head dim, W capacity = window_size for a bounded window):

    keys, values  [B, H, W, D]  in the model's dtype. Head-major, so that one decode
                                program streams one head's slots contiguously.
    decays        [B, HQ, W]    float32, or None when the layer has no gate.
    positions     [B, W]        int64: index of the slot's token in the token stream
                                (padding included, the same for all rows), or -1 when the
                                slot is empty or holds a padding token. The decode op uses it
                                for window membership (p - position < w) and validity.
    split_counters [B, HQ]      int32, zero between steps: the Triton decode kernel counts the
                                slot splits of each (batch row, kv head, row block) that are
                                done on one entry, and the last one sets it back to zero.
    extra_state   dict[str, Tensor], free for the layer (e.g. the token-shift state: the
                                previous token's key/value projections, [B, H, D] each).

Batched prompts of different lengths are left-padded (attention_mask [B, T], 0 = padding,
all padding before the first real token). Real tokens of a row are then contiguous in the
stream, so distances in stream positions equal distances in real tokens, and padding slots
(position -1) are never attended.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from gatedfwa.ops.common.validation import check_float_tensor, check_gate_like, check_window, format_shape

__all__ = ["WindowLayerCache", "WindowCache"]

_INITIAL_UNBOUNDED_CAPACITY = 256


class WindowLayerCache:
    """Bounded window cache of one attention layer (a ring buffer of ``window_size`` slots).

    Args:
        window_size: the layer's window w (an int >= 1), or None for unbounded attention
            ("full" or "forgetting"): then the cache grows with the sequence.

    Buffers are allocated on the first :meth:`prefill` or decode step, with the shapes of
    the tensors given there (or explicitly with :meth:`allocate`). After that their shapes
    never change for a bounded window: memory is O(w) however many tokens are generated.
    """

    def __init__(self, window_size: int | None):
        check_window(window_size)
        self.window_size = window_size
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.decays: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.token_counts: torch.Tensor | None = None
        self.split_counters: torch.Tensor | None = None
        self.extra_state: dict[str, torch.Tensor] = {}
        self.seen_tokens = 0
        self.num_q_heads = 0
        self.gated = False

    # ---------------------------------------------------------------- properties

    @property
    def is_allocated(self) -> bool:
        return self.keys is not None

    @property
    def capacity(self) -> int:
        """Number of slots W (0 before allocation)."""
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def slots_in_use(self) -> int:
        """Slots [0, n) hold tokens (or padding); later slots were never written. A decode
        step scans only these."""
        return min(self.seen_tokens, self.capacity)

    @property
    def batch_size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return 0 if self.keys is None else self.keys.shape[3]

    def get_seq_length(self) -> int:
        """Tokens written so far, padding included: the stream position of the next token."""
        return self.seen_tokens

    @property
    def holds_tokens(self) -> bool:
        """True once a prompt was written: the next input is decoded against the cache."""
        return self.seen_tokens > 0

    def set_extra_state(self, name: str, value: torch.Tensor) -> None:
        """Keep a copy of value as extra_state[name] (the layer's own state, e.g. token shift)."""
        self.extra_state[name] = value.clone()

    # ---------------------------------------------------------------- lifecycle

    def allocate(
        self,
        batch_size: int,
        num_kv_heads: int,
        num_q_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        gated: bool,
        capacity: int | None = None,
    ) -> None:
        """Allocate empty buffers (any previous content is dropped). ``capacity`` is only
        for unbounded caches (default 256 slots, doubled when needed)."""
        if num_q_heads % num_kv_heads != 0:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if self.window_size is not None:
            slots = self.window_size
        else:
            slots = max(1, capacity or _INITIAL_UNBOUNDED_CAPACITY)
        kv_shape = (batch_size, num_kv_heads, slots, head_dim)
        self.keys = torch.zeros(kv_shape, dtype=dtype, device=device)
        self.values = torch.zeros(kv_shape, dtype=dtype, device=device)
        self.decays = (
            torch.zeros((batch_size, num_q_heads, slots), dtype=torch.float32, device=device) if gated else None
        )
        self.positions = torch.full((batch_size, slots), -1, dtype=torch.int64, device=device)
        self.token_counts = torch.zeros((batch_size,), dtype=torch.int64, device=device)
        self.split_counters = torch.zeros((batch_size, num_q_heads), dtype=torch.int32, device=device)
        self.extra_state = {}
        self.seen_tokens = 0
        self.num_q_heads = num_q_heads
        self.gated = gated

    def reset(self) -> None:
        """Forget every token (buffers are kept, marked empty); extra_state is cleared."""
        self.seen_tokens = 0
        self.extra_state = {}
        if self.positions is not None:
            self.positions.fill_(-1)
            self.token_counts.zero_()
            if self.decays is not None:
                self.decays.zero_()

    def memory_bytes(self) -> int:
        """Bytes held by every tensor of this cache, extra_state included."""
        tensors = [self.keys, self.values, self.decays, self.positions, self.token_counts, self.split_counters]
        tensors += list(self.extra_state.values())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the cache by name (for inspection and tests)."""
        named = {"keys": self.keys, "values": self.values, "decays": self.decays,
                 "positions": self.positions, "token_counts": self.token_counts,
                 "split_counters": self.split_counters}
        named.update({f"extra_state.{k}": v for k, v in self.extra_state.items()})
        return {k: v for k, v in named.items() if v is not None}

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep rows ``batch_indices`` (beam search reordering, dropping finished rows)."""
        if self.keys is None:
            return
        index = batch_indices.to(self.keys.device, torch.long)
        for name in ("keys", "values", "decays", "positions", "token_counts", "split_counters"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index))
        self.extra_state = {k: v.index_select(0, index.to(v.device)) for k, v in self.extra_state.items()}

    # ---------------------------------------------------------------- checks

    def check_step(self, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, num_q_heads: int,
                   k_name: str = "k", v_name: str = "v", g_name: str = "g") -> None:
        """k/v [B, T, H, D] and g [B, T, HQ] (or None) agree with each other and, once
        allocated, with this cache (batch, heads, head dim, dtype, device, gate on/off)."""
        for name, x in ((k_name, k), (v_name, v)):
            check_float_tensor(name, x, 4, "[batch, seqlen, kv_heads, head_dim]")
        if k.shape != v.shape:
            raise ValueError(f"{k_name} and {v_name} must have the same shape, got {format_shape(k)} and {format_shape(v)}")
        if k.dtype != v.dtype or k.device != v.device:
            raise TypeError(f"{k_name} and {v_name} must share dtype and device, got {k.dtype}/{k.device} "
                            f"and {v.dtype}/{v.device}")
        check_gate_like(g, (k.shape[0], k.shape[1], num_q_heads), k.device, g_name, k_name)
        if self.keys is None:
            return
        batch, heads, _, head_dim = self.keys.shape
        if k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != head_dim:
            raise ValueError(
                f"{k_name} must have shape [batch={batch}, seqlen, kv_heads={heads}, head_dim={head_dim}] "
                f"to match the cache, got {format_shape(k)}"
            )
        if num_q_heads != self.num_q_heads:
            raise ValueError(f"the cache holds {self.num_q_heads} query heads, got {num_q_heads}")
        if k.dtype != self.keys.dtype:
            raise TypeError(f"{k_name} must have the cache's dtype {self.keys.dtype}, got {k.dtype}")
        if k.device != self.keys.device:
            raise ValueError(f"{k_name} must be on the cache's device {self.keys.device}, got {k.device}")
        if self.gated and g is None:
            raise ValueError(f"{g_name} is required: the cache was filled with gates")
        if not self.gated and g is not None:
            raise ValueError(f"{g_name} must be None: the cache was filled without gates")

    # ---------------------------------------------------------------- writing

    def prefill(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_q_heads: int | None = None,
    ) -> None:
        """Fill an empty cache from a prompt processed by the parallel path.

        Args:
            k, v: [B, T, H, D], the prompt's keys and values (after rotary, norms, token shift).
            g: [B, T, HQ] log gates (<= 0), or None for a layer without gate.
            attention_mask: [B, T] (1 = token, 0 = padding), left-padded; None = no padding.
            num_q_heads: HQ when g is None (defaults to H); ignored otherwise.

        Keeps the last W tokens; their decays are suffix sums of the gates inside those W
        tokens only (sums of same-signed terms, no cumulative sum over the prompt).
        """
        hq = g.shape[2] if isinstance(g, torch.Tensor) and g.dim() == 3 else (num_q_heads or k.shape[2])
        if self.seen_tokens != 0:
            raise ValueError("prefill needs an empty cache (call reset() first); "
                             f"this one already holds {self.seen_tokens} tokens")
        self.check_step(k, v, g, hq)
        batch, seqlen, heads, head_dim = k.shape
        mask = self._check_mask(attention_mask, batch, seqlen, k.device)
        if (not self.is_allocated or self.batch_size != batch or self.num_kv_heads != heads
                or self.head_dim != head_dim or self.gated != (g is not None) or self.keys.dtype != k.dtype):
            self.allocate(batch, heads, hq, head_dim, k.dtype, k.device, g is not None,
                          capacity=max(seqlen * 2, _INITIAL_UNBOUNDED_CAPACITY))
        self._ensure_capacity(seqlen)
        if seqlen == 0:
            return
        keep = min(seqlen, self.capacity)
        first = seqlen - keep
        stream = torch.arange(first, seqlen, device=k.device)
        slots = stream % self.capacity if self.window_size is not None else stream
        real = torch.ones((batch, keep), dtype=torch.bool, device=k.device) if mask is None else mask[:, first:]
        # Padding rows are zeroed: they are never attended, but a NaN there would still
        # poison a matmul (0 * NaN = NaN).
        k_kept = torch.where(real[:, :, None, None], k[:, first:], 0).transpose(1, 2)
        v_kept = torch.where(real[:, :, None, None], v[:, first:], 0).transpose(1, 2)
        self.keys.index_copy_(2, slots, k_kept)
        self.values.index_copy_(2, slots, v_kept)
        self.positions.index_copy_(1, slots, torch.where(real, stream[None, :], -1))
        if g is not None:
            gates = torch.where(real[:, :, None], g[:, first:].float(), 0.0)  # [B, keep, HQ]
            self.decays.index_copy_(2, slots, _suffix_sums_after(gates).transpose(1, 2))
        self.token_counts.copy_(mask.sum(1) if mask is not None else torch.full_like(self.token_counts, seqlen))
        self.seen_tokens = seqlen

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, g_new: torch.Tensor | None,
               shift_decays: bool = True) -> None:
        """Write L new tokens (k_new/v_new [B, L, H, D], g_new [B, L, HQ]) after the
        cached ones: every cached decay grows by the L gates (unless the caller has done
        that already: ``shift_decays=False``), the new tokens take their slots (the oldest
        tokens leave a full ring), and their decays are the sums of the gates after them.
        Called by the decode op after it has read the cache."""
        length = k_new.shape[1]
        self._ensure_capacity(self.seen_tokens + length)
        keep = min(length, self.capacity)
        first = length - keep  # a ring smaller than L keeps only the last W new tokens
        new_decays = None
        if g_new is not None:
            gates = g_new.float()
            if shift_decays:
                self.decays += gates.sum(1)[:, :, None]
            if length > 1:
                new_decays = _suffix_sums_after(gates)[:, first:]  # [B, keep, HQ]
        # Written run by run of consecutive slots rather than through an index tensor: a
        # decode step of one token then costs one small copy per tensor, with no slot
        # indices to build (narrow = a slice along one dimension, a view).
        for slot, offset, count in self._slot_runs(self.seen_tokens + first, keep):
            self.keys.narrow(2, slot, count).copy_(k_new.narrow(1, first + offset, count).transpose(1, 2))
            self.values.narrow(2, slot, count).copy_(v_new.narrow(1, first + offset, count).transpose(1, 2))
            position = self.seen_tokens + first + offset
            if count == 1:
                self.positions.narrow(1, slot, 1).fill_(position)
            else:
                positions = torch.arange(position, position + count, device=self.positions.device)
                self.positions.narrow(1, slot, count).copy_(positions)
            if new_decays is not None:
                self.decays.narrow(2, slot, count).copy_(new_decays.narrow(1, offset, count).transpose(1, 2))
            elif g_new is not None:
                self.decays.narrow(2, slot, count).zero_()  # a single new token: no gate after it yet
        self.token_counts += length
        self.seen_tokens += length

    # ---------------------------------------------------------------- helpers

    def _ensure_capacity(self, needed: int) -> None:
        """Unbounded caches double their capacity until ``needed`` slots fit."""
        if self.window_size is not None or needed <= self.capacity:
            return
        new_capacity = self.capacity
        while new_capacity < needed:
            new_capacity *= 2
        grow = new_capacity - self.capacity

        def grown(t: torch.Tensor, dim: int, fill) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = grow
            return torch.cat([t, t.new_full(shape, fill)], dim=dim)

        self.keys = grown(self.keys, 2, 0)
        self.values = grown(self.values, 2, 0)
        if self.decays is not None:
            self.decays = grown(self.decays, 2, 0)
        self.positions = grown(self.positions, 1, -1)

    def _slot_runs(self, first_position: int, count: int) -> list[tuple[int, int, int]]:
        """Where the tokens at stream positions first_position .. first_position + count - 1
        (count <= capacity) live: runs (first slot, index of the run's first token among the
        count, run length) of consecutive slots. One run, or two where a ring wraps around."""
        if self.window_size is None:
            return [(first_position, 0, count)]
        slot = first_position % self.capacity
        head = min(count, self.capacity - slot)
        return [(slot, 0, head)] if head == count else [(slot, 0, head), (0, head, count - head)]

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, batch: int, seqlen: int, device) -> torch.Tensor | None:
        """attention_mask [B, T] -> bool, checked to be left padding (no 1 before a 0)."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (batch, seqlen):
            raise ValueError(f"attention_mask must have shape [batch, seqlen] = [{batch}, {seqlen}], got {format_shape(mask)}")
        mask = mask.to(device=device) != 0
        if seqlen > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise ValueError("attention_mask must be left-padded (zeros only before a row's first token)")
        return mask


def _suffix_sums_after(gates: torch.Tensor) -> torch.Tensor:
    """gates [B, n, HQ] float32 -> s [B, n, HQ] with s[:, j] = gates[:, j+1] + ... + gates[:, n-1]
    (0 for the last token). Summed from the end: every partial sum adds same-signed terms."""
    after = gates[:, 1:].flip(1).cumsum(1).flip(1)
    return torch.cat([after, torch.zeros_like(gates[:, :1])], dim=1)


class WindowCache:
    """The decoding cache of a model: one :class:`WindowLayerCache` per attention layer.

    Args:
        window_sizes: one window per layer (an int, or None for an unbounded layer).
    """

    def __init__(self, window_sizes: Sequence[int | None]):
        self.layers = [WindowLayerCache(w) for w in window_sizes]

    @classmethod
    def uniform(cls, num_layers: int, window_size: int | None) -> "WindowCache":
        return cls([window_size] * num_layers)

    def __getitem__(self, layer_idx: int) -> WindowLayerCache:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[WindowLayerCache]:
        return iter(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (padding included)."""
        return self.layers[layer_idx].seen_tokens if self.layers else 0

    @property
    def holds_tokens(self) -> bool:
        """True once a prompt was written (the model then decodes its input)."""
        return self.get_seq_length() > 0

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)
