"""Padding masks to packed variable-length batches and back.

A padded batch [B, T, ...] with attention_mask [B, T] (1 = real token, 0 = padding) becomes
one packed row [1, N, ...] holding only the N real tokens, row after row, with
cu_seqlens = [0, n_0, n_0 + n_1, ..., N]. The attention op keeps every sum (softmax and
gate decay) inside one sequence, so padding never leaks into real tokens: the result for a
real token is exactly what its row computes without any padding. Padding positions come
back as zeros.

Masked tokens in the middle of a row are dropped the same way: the tokens around them
become neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedLayout", "packed_layout", "pack", "unpack", "positions_from_mask"]


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
