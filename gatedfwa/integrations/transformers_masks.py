"""The attention masks of `transformers` models, turned into what the gatedfwa op takes.

A `transformers` model builds one mask per kind of layer (full, sliding) through the mask
function registered for its attention implementation, and hands it to every layer of that
kind. For attn_implementation="gatedfwa", :func:`gatedfwa_mask` is that mask function. When
the model reads a whole sequence at once (training, prefill: as many queries as keys, no
cache offset) it returns a :class:`WindowMaskLayout`: the window size and where the
sequences lie in the [B, T] grid (one per row, several packed in a row, padding between),
which is all the op needs. Otherwise (decoding steps, prefill against a cache that already
holds tokens) it returns the boolean mask that `attn_implementation="sdpa"` would use, and the
attention function runs PyTorch SDPA with it.

How a layout is found, exactly (docs/transformers.md):

* Fast path. When transformers allows the causal shortcut (``allow_is_causal_skip``: no
  packing detected, no extra mask functions, the same condition under which sdpa drops the
  mask and uses ``is_causal=True``) and there is no padding, the mask is a causal mask over
  each whole row, with the window ``local_size`` if the model gave one. The mask function
  is evaluated at O(T) probe pairs that tell full causal, sliding-window and chunked masks
  apart; a disagreement sends the call to the dense path.
* Dense path. Otherwise the mask is built as sdpa builds it ([B, 1, T, T] booleans) and
  read: a real token continues its predecessor's sequence when it sees it; the window is
  the most keys any row sees when some row sees fewer keys than its sequence offers. The
  layout is then rebuilt into a mask and compared with the original for every real row; any
  difference (bidirectional attention, prefix masks, image-token overlays, a window that
  counts padding...) raises an error instead of computing something else. Chunked
  attention (Llama 4) passes: it is causal attention within chunks, one sequence each.

Padding tokens (attention_mask == 0) are left out of every sequence; their output rows are
zero, as documented in docs/transformers.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

__all__ = ["WindowMaskLayout", "gatedfwa_mask", "layout_from_dense_mask", "UnsupportedMaskError"]


class UnsupportedMaskError(NotImplementedError):
    """The model's attention mask is not a causal (sliding-window) mask over sequences."""


@dataclass(frozen=True)
class WindowMaskLayout:
    """The attention pattern of one mask, as the gatedfwa op takes it.

    Every real token attends, causally, to the real tokens of its own sequence within the
    window (itself included); distances count real tokens only.

    batch_size, seqlen: B and T of the [B, T] token grid the mask was built for.
    window_size: keys a query sees, itself included; None = full causal.
    max_seqlen: length of the longest sequence (a window at least this long does nothing).
    cu_seqlens: int32 [N + 1] offsets of the N sequences in the packed row of real tokens
        (row after row), or None when every row of the grid is one whole sequence.
    token_index: int64 [R] flat positions (b * T + t) of the R real tokens, or None when
        every token is real.
    """

    batch_size: int
    seqlen: int
    window_size: int | None
    max_seqlen: int
    cu_seqlens: torch.Tensor | None = None
    token_index: torch.Tensor | None = None

    # transformers may hand a mask it prepared back to its own mask builders (generate()
    # prepares masks ahead of the forward pass for static caches); they read .ndim to tell
    # a 2D padding mask from a prepared mask, and gatedfwa_mask returns a layout it gets as is.
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the boolean mask this layout stands for: [B, 1, T, T]."""
        return (self.batch_size, 1, self.seqlen, self.seqlen)

    def effective_window(self, window_size: int | None) -> int:
        """The keys a query can actually see under ``window_size`` in these sequences."""
        return self.max_seqlen if window_size is None else min(window_size, self.max_seqlen)


def gatedfwa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> WindowMaskLayout | torch.Tensor:
    """The mask function registered as "gatedfwa" in transformers' AttentionMaskInterface.

    Takes the arguments transformers' mask builders pass to every mask function
    (masking_utils.create_causal_mask and friends): the grid sizes and offsets, the index
    based ``mask_function`` (causal, sliding window, packing and overlays folded in), and
    the 2D padding mask ``attention_mask`` [B, >= kv_length] (True = token).

    Returns a WindowMaskLayout when the queries are the whole sequence (q_length ==
    kv_length, no offsets); otherwise the [B, 1, q_length, kv_length] boolean mask sdpa
    would use, always materialised so that the attention function can tell the two apart.
    """
    if isinstance(attention_mask, WindowMaskLayout):  # prepared earlier (see WindowMaskLayout.ndim)
        if attention_mask.shape != (batch_size, 1, q_length, kv_length):
            raise ValueError(
                f"a gatedfwa mask prepared for shape {list(attention_mask.shape)} was given for "
                f"[{batch_size}, 1, {q_length}, {kv_length}]"
            )
        return attention_mask
    reads_whole_sequence = (
        q_length == kv_length and not isinstance(q_offset, torch.Tensor) and q_offset == 0 and kv_offset == 0
    )
    if not reads_whole_sequence:
        return sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
            local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
            use_vmap=use_vmap, device=device,
        )

    seqlen = q_length
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, :seqlen].to(device=device, dtype=torch.bool)
        if bool(padding.all()):
            padding = None

    if (
        allow_is_causal_skip
        and padding is None
        and not use_vmap
        and _agrees_with_causal_window(mask_function, batch_size, seqlen, local_size, device)
    ):
        return WindowMaskLayout(batch_size=batch_size, seqlen=seqlen, window_size=local_size, max_seqlen=seqlen)

    dense = sdpa_mask(
        batch_size=batch_size, q_length=seqlen, kv_length=seqlen, mask_function=mask_function,
        attention_mask=padding, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
        use_vmap=use_vmap, device=device,
    )
    real = torch.ones(batch_size, seqlen, dtype=torch.bool, device=device) if padding is None else padding
    return layout_from_dense_mask(dense.expand(batch_size, 1, seqlen, seqlen)[:, 0], real)


def _agrees_with_causal_window(
    mask_function: Callable, batch_size: int, seqlen: int, window_size: int | None, device
) -> bool:
    """Whether mask_function matches "kv <= q and q - kv < window" at the pairs where causal,
    sliding-window and chunked masks differ: for every query q the keys q + 1, q, q - 1, 0,
    q - w + 1 and q - w. O(B * T) evaluations instead of the O(B * T^2) of a full check."""
    query = torch.arange(seqlen, device=device)
    offsets = [1, 0, -1]
    if window_size is not None:
        offsets += [1 - window_size, -window_size]
    keys = [query + d for d in offsets] + [torch.zeros_like(query)]
    kv_idx = torch.cat(keys)
    q_idx = query.repeat(len(keys))
    inside = (kv_idx >= 0) & (kv_idx < seqlen)
    q_idx, kv_idx = q_idx[inside], kv_idx[inside]
    expected = kv_idx <= q_idx
    if window_size is not None:
        expected &= q_idx - kv_idx < window_size
    batch_idx = torch.arange(batch_size, device=device)[:, None]
    head_idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    got = mask_function(batch_idx, head_idx, q_idx[None], kv_idx[None])
    return bool((torch.broadcast_to(got, (batch_size, q_idx.numel())) == expected[None]).all())


def layout_from_dense_mask(mask: torch.Tensor, real: torch.Tensor) -> WindowMaskLayout:
    """Read a boolean mask as sequences and a window, and check that they rebuild it exactly.

    mask: [B, T, T] bool, True where query t (dim 1) attends key j (dim 2).
    real: [B, T] bool, False at padding tokens (their rows are not read; their outputs
        will be zero).

    Raises UnsupportedMaskError when some real row differs from the rebuilt mask.
    """
    batch, seqlen = real.shape
    device = real.device
    positions = torch.arange(seqlen, device=device).expand(batch, seqlen)
    rank = real.long().cumsum(dim=1) - 1  # index of each token among its row's real tokens

    # The nearest real token before t (-1 if none); t continues its sequence when it sees it.
    last_real = torch.where(real, positions, -1).cummax(dim=1).values
    previous_real = torch.cat([last_real.new_full((batch, 1), -1), last_real[:, :-1]], dim=1)
    sees_previous = mask.gather(2, previous_real.clamp(min=0)[..., None])[..., 0]
    starts = real & ~((previous_real >= 0) & sees_previous)

    # Sequence ids unique over the whole grid; the position of a token inside its sequence.
    sequence = torch.cumsum(starts.reshape(-1).long(), dim=0).view(batch, seqlen) - 1
    start_rank = torch.where(starts, rank, -1).cummax(dim=1).values
    offset_in_sequence = rank - start_rank

    # Window: the most keys any real row sees, if some row sees fewer than its sequence offers.
    keys_seen = mask.sum(dim=2)
    window_size = None
    if bool(((keys_seen < offset_in_sequence + 1) & real).any()):
        window_size = int(keys_seen[real].max())

    rebuilt = (
        real[:, :, None]
        & real[:, None, :]
        & (sequence[:, :, None] == sequence[:, None, :])
        & (rank[:, None, :] <= rank[:, :, None])
    )
    if window_size is not None:
        rebuilt &= rank[:, :, None] - rank[:, None, :] < window_size
    wrong_rows = ((rebuilt != mask) & real[:, :, None]).any(dim=2)
    if bool(wrong_rows.any()):
        b, t = (int(i) for i in wrong_rows.nonzero()[0])
        raise UnsupportedMaskError(
            "attn_implementation='gatedfwa' computes causal attention within sequences (packed or "
            "padded), with an optional sliding window; this model's attention mask is something else "
            f"(first differing query: batch {b}, position {t}; e.g. bidirectional or prefix attention, "
            "image-token overlays, or a window that counts padding positions). Use "
            "attn_implementation='sdpa' for this model."
        )

    lengths = torch.bincount(sequence[real], minlength=int(starts.sum()))
    all_real = bool(real.all())
    one_sequence_per_row = all_real and lengths.numel() == batch
    cu_seqlens = None
    if not one_sequence_per_row:
        cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
        cu_seqlens[1:] = torch.cumsum(lengths, dim=0)
    return WindowMaskLayout(
        batch_size=batch,
        seqlen=seqlen,
        window_size=window_size,
        max_seqlen=int(lengths.max()) if lengths.numel() else 0,
        cu_seqlens=cu_seqlens,
        token_index=None if all_real else real.reshape(-1).nonzero().squeeze(-1),
    )
