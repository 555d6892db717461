"""Decoding with a bounded window cache (docs/decoding.md).

    cache.py       WindowLayerCache (one layer's ring buffer), WindowCache (a model's layers)
    reference.py   the decode step in PyTorch
    kernels.py     the decode step in Triton
    op.py          decode_gated_window_attention: checks, dispatch, cache update
"""

from gatedfwa.ops.decode.cache import WindowCache, WindowLayerCache
from gatedfwa.ops.decode.op import MAX_DECODE_LENGTH, decode_gated_window_attention

__all__ = ["WindowCache", "WindowLayerCache", "decode_gated_window_attention", "MAX_DECODE_LENGTH"]
