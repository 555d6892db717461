"""Padding masks to packed variable-length batches and back.

A padded batch [B, T, ...] with attention_mask [B, T] (1 = real token, 0 = padding) becomes
one packed row [1, N, ...] holding only the N real tokens, row after row, with
cu_seqlens = [0, n_0, n_0 + n_1, ..., N]. The attention op keeps every sum (softmax and
gate decay) inside one sequence, so padding never leaks into real tokens: the result for a
real token is exactly what its row computes without any padding. Padding positions come
back as zeros.

Masked tokens in the middle of a row are dropped the same way: the tokens around them
become neighbours.

:func:`pack_padded` is the one place a padded batch is packed: the model calls it once
before its first layer, a layer called on its own with an attention_mask calls it itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedLayout", "packed_layout", "flattened_layout", "pack", "unpack", "positions_from_mask", "pack_padded"]


@dataclass
class PackedLayout:
    """Where the real tokens of a padded batch sit.

    indices: [N] int64 flat positions (b * T + t) of the real tokens, row-major.
    cu_seqlens: [B + 1] int32 offsets of each row's tokens in the packed row.
    batch, seqlen: B and T of the padded batch.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    batch: int
    seqlen: int


def packed_layout(attention_mask: torch.Tensor) -> PackedLayout:
    """attention_mask [B, T] (bool or 0/1 integers) -> PackedLayout."""
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must have 2 dimensions [batch, seqlen] (1 = token, 0 = padding), "
            f"got shape {list(attention_mask.shape)}"
        )
    keep = attention_mask.bool()
    batch, seqlen = keep.shape
    indices = keep.reshape(-1).nonzero().squeeze(-1)
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=attention_mask.device)
    cu_seqlens[1:] = torch.cumsum(lengths, dim=0)
    return PackedLayout(indices=indices, cu_seqlens=cu_seqlens, batch=batch, seqlen=seqlen)


def flattened_layout(
    batch: int,
    seqlen: int,
    device: torch.device,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> PackedLayout | None:
    """The layout of rows that hold several sequences back to back, without padding (what
    transformers' DataCollatorWithFlattening makes: one row, rotary positions that restart for
    each sequence), or None when every row is one sequence.

    The sequences are read from the first of these that is given:
        cu_seqlens: [N + 1] offsets of N sequences in the flattened [B * T] tokens (flash
            attention's ``cu_seq_lens_q``), starting at 0 and ending at B * T;
        seq_idx: [B, T] the sequence each token belongs to; a sequence starts where it changes;
        position_ids: [B, T] rotary positions; a sequence starts where the position does not
            increase (a restart at 0, or at any value not above the previous one).
    Each row also starts a sequence. Reading seq_idx or position_ids costs one host
    synchronisation (the number of sequences sets the layout's size); cu_seqlens costs one
    for its check in eager mode and none under torch.compile.
    """
    total = batch * seqlen
    if cu_seqlens is not None:
        cu_seqlens = torch.as_tensor(cu_seqlens, device=device).to(torch.int32).reshape(-1)
        row_starts = torch.arange(0, total, seqlen, device=device, dtype=torch.int32)
        # The values are checked in eager mode only: reading them is a host synchronisation,
        # which would break a compiled graph.
        if cu_seqlens.numel() < 2 or not torch.compiler.is_compiling() and (
                int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any())
                or not bool(torch.isin(row_starts, cu_seqlens).all())):
            raise ValueError(
                f"cu_seq_lens must be non-decreasing offsets from 0 to batch * seqlen = {total} that include each "
                f"row's start, got {cu_seqlens.tolist()}")
        if cu_seqlens.numel() - 1 == batch:
            return None
        return PackedLayout(torch.arange(total, device=device), cu_seqlens.contiguous(), batch, seqlen)
    name, marks = ("seq_idx", seq_idx) if seq_idx is not None else ("position_ids", position_ids)
    if marks is None:
        return None
    if tuple(marks.shape) != (batch, seqlen):
        raise ValueError(f"{name} must have shape [batch, seqlen] = {[batch, seqlen]}, got {list(marks.shape)}")
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    if seq_idx is not None:
        starts[:, 1:] = marks[:, 1:] != marks[:, :-1]
    else:
        starts[:, 1:] = marks[:, 1:] <= marks[:, :-1]
    offsets = starts.reshape(-1).nonzero().reshape(-1)  # the host synchronisation
    if offsets.numel() == batch:
        return None
    cu_seqlens = torch.cat((offsets, offsets.new_tensor([total]))).to(torch.int32)
    return PackedLayout(torch.arange(total, device=device), cu_seqlens, batch, seqlen)


def pack(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """x [B, T, ...] -> [1, N, ...] (the real tokens only)."""
    flat = x.reshape(layout.batch * layout.seqlen, *x.shape[2:])
    return flat.index_select(0, layout.indices)[None]


def unpack(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """x [1, N, ...] -> [B, T, ...] with zeros at the padding positions."""
    out = x.new_zeros((layout.batch * layout.seqlen, *x.shape[2:]))
    out = out.index_copy(0, layout.indices, x[0])
    return out.view(layout.batch, layout.seqlen, *x.shape[2:])


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions [B, T] int64 that count only real tokens: a left-padded row's first
    real token is position 0, as it would be without padding (padding positions give 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def pack_padded(
    attention_mask: torch.Tensor,
    x: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    extra: tuple[torch.Tensor, ...] = (),
) -> tuple[PackedLayout | None, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Packs a padded batch for attention, with its rotary positions.

    Args:
        attention_mask: [B, T], 1 = token, 0 = padding (anywhere in a row).
        x: [B, T, ...], e.g. hidden states [B, T, C].
        position_ids: [B, T] rotary positions; default: each token's rank among its row's
            real tokens (positions_from_mask).
        extra: more tensors laid out [B, T, ...] to pack alike (e.g. precomputed rotary
            angles).

    Returns:
        (layout, x, position_ids, extra). With padding, layout describes it and every
        tensor is packed to [1, N, ...] (undo with unpack(..., layout)); without (a mask of
        ones) layout is None and the tensors come back [B, T, ...] as they were.
    """
    batch, seqlen = x.shape[:2]
    if tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(
            f"attention_mask must have shape [batch, seqlen] = {[batch, seqlen]} (1 = token, 0 = padding), "
            f"got {list(attention_mask.shape)}"
        )
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    if bool(attention_mask.bool().all()):
        return None, x, position_ids, tuple(extra)
    layout = packed_layout(attention_mask)
    return layout, pack(x, layout), pack(position_ids, layout), tuple(pack(t, layout) for t in extra)
