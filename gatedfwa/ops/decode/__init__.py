"""Decoding with a bounded window cache (docs/decoding.md).

    cache.py         WindowLayerCache (one layer's ring buffer), WindowCache (a model's layers)
    static_cache.py  StaticWindowLayerCache / StaticWindowCache: fixed shapes, the position on
                     the device (a decode step replays as a CUDA graph)
    naive.py         the float64 oracle of the tests: the window op's reference on the whole
                     stream
    torch_path.py    the decode step in PyTorch
    kernels.py       the decode step in Triton, one launch (split window, merged by the last split)
    launch.py        the kernels' tile sizes and slot splits
    op.py            decode_gated_window_attention: checks, dispatch, cache update
    static_op.py     decode_static_step: the same against a static cache, no host position
    chunked.py       chunked prefill: a prompt chunk against [cached window || chunk]
"""

from gatedfwa.ops.decode.cache import WindowCache, WindowLayerCache
from gatedfwa.ops.decode.op import MAX_DECODE_LENGTH, decode_gated_window_attention
from gatedfwa.ops.decode.static_cache import StaticWindowCache, StaticWindowLayerCache
from gatedfwa.ops.decode.static_op import decode_static_step

__all__ = ["WindowCache", "WindowLayerCache", "StaticWindowCache", "StaticWindowLayerCache",
           "decode_gated_window_attention", "decode_static_step", "MAX_DECODE_LENGTH"]
