"""Decoding NSA with the Triton kernels: L new tokens against an NSALayerCache are a call with
fewer queries than keys (layout.py).

After the new tokens are written to the cache (window, kept keys, block summaries), row b of
the batch holds n_b real tokens, its L new ones last, so its queries are the last L key
positions of a sequence of n_b keys: exactly the fewer-queries convention of nsa_attention.
The rows become packed sequences (cu_seqlens_q = [0, L, 2L, ...], cu_seqlens_k the running
sum of n_b; blocks count from each row's first real token, as the cache counts them) and the
forward kernels run as they do in the parallel op:

    compressed   compressed.compressed_forward over the cached summaries (cast to q's
                 dtype, as pooling.py casts the parallel op's)
    selection    selection.select_blocks from its lse2
    selected     selected.query_major_forward over the kept keys (query-major whatever the
                 group: no host work to invert the selection)

The sliding branch is the window decode op, as on the PyTorch path (decode.py).

Cost beyond the kernels: the rows' lengths are read on the host once per call, and the kept
keys and values are handed to the kernels as [tokens, H, D]: a strided view of the cache for
one row (no copy), a packed copy of every row's real tokens for several (O(T) per call).
"""

from __future__ import annotations

import torch

from gatedfwa.ops.nsa.cache import NSALayerCache
from gatedfwa.ops.nsa.compressed import compressed_forward
from gatedfwa.ops.nsa.layout import SequenceLayout
from gatedfwa.ops.nsa.selected import query_major_forward
from gatedfwa.ops.nsa.selection import select_blocks

__all__ = ["triton_decode_branches"]


def _offsets(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def _kept_rows(store: torch.Tensor, lengths: list[int], seen: int) -> torch.Tensor:
    """store [B, H, capacity, D] (head-major, token p of the stream in slot p) -> [1, sum n_b,
    H, D]: each row's last n_b tokens (its real ones) packed; a view when B == 1."""
    rows = [store[b, :, seen - n: seen].transpose(0, 1) for b, n in enumerate(lengths)]  # [n_b, H, D]
    return (rows[0] if len(rows) == 1 else torch.cat(rows))[None]


def _summary_rows(summaries: torch.Tensor, lengths: list[int], block_size: int, dtype) -> torch.Tensor:
    """summaries [B, H, S, D] float32 -> [sum (n_b // BS), H, D] in dtype: each row's complete
    blocks, packed in the order of pooling.py."""
    rows = [summaries[b, :, : n // block_size].transpose(0, 1) for b, n in enumerate(lengths)]
    return torch.cat(rows).to(dtype)


def triton_decode_branches(q: torch.Tensor, cache: NSALayerCache, block_counts: int, scale: float, want_compressed: bool,
                           want_selected: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """q [B, L, HQ, D] of the last L tokens written to cache (each row's last L real tokens).
    Returns (o_cmp, o_slc) [B, L, HQ, D] in q's dtype, None for a branch not wanted."""
    batch, num_new, num_q_heads, head_dim = q.shape
    keys, values = cache.kept.keys, cache.kept.values
    num_kv_heads = keys.shape[1]
    lengths = cache.token_counts.tolist()  # one host read per call
    seen = cache.seen_tokens
    queries = q.reshape(1, batch * num_new, num_q_heads, head_dim).contiguous()
    cu_seqlens_k = _offsets(lengths, q.device)
    cu_seqlens_q = _offsets([num_new] * batch, q.device)
    layout = SequenceLayout(queries, num_kv_heads, cache.block_size, cu_seqlens_k, seqlen_k=sum(lengths),
                            cu_seqlens_q=cu_seqlens_q)
    k_cmp = _summary_rows(cache.key_summaries, lengths, cache.block_size, q.dtype)
    v_cmp = _summary_rows(cache.value_summaries, lengths, cache.block_size, q.dtype)
    o_cmp, lse = compressed_forward(queries, k_cmp, v_cmp, layout, scale)
    o_slc = None
    if want_selected:
        indices = select_blocks(queries, k_cmp, lse, layout, block_counts, scale)
        o_slc, _ = query_major_forward(queries, _kept_rows(keys, lengths, seen), _kept_rows(values, lengths, seen),
                                       indices, layout, scale)
        o_slc = o_slc.view(q.shape)
    return (o_cmp.view(q.shape) if want_compressed else None), o_slc
