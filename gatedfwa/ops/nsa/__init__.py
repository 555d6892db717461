"""Native Sparse Attention (arXiv 2502.11089) with GatedFWA as its sliding branch.

    from gatedfwa.ops.nsa import nsa_attention

Files:
    naive.py        the float64 oracle of the tests (quadratic), and the rules in words
    rules.py        the rules every path shares: block summaries, compressed attention, the
                    selection rule, the branches' combination
    torch_path.py   the PyTorch path with bounded memory
    sliding.py      the sliding branch: the window op
    layout.py       sizes and sequence bookkeeping of one call
    pooling.py      block summaries for the Triton path (PyTorch autograd)
    tiles.py        device helpers of the kernels
    compressed.py, selection.py, selected.py, selected_block_major.py   the Triton kernels
    launch.py       the kernels' tile sizes, warps and output buffers
    triton_path.py  the Triton path: the kernels composed, with their custom ops
    validation.py   argument checks
    op.py           nsa_attention: checks, dispatch
Decoding: cache.py (NSALayerCache: window ring buffer, every key/value, block summaries),
decode.py (decode_nsa_attention: the step in PyTorch, and the dispatch) and decode_triton.py
(the new tokens as one fewer-queries call of the Triton kernels).
docs/nsa.md describes the math.
"""

from gatedfwa.ops.nsa.cache import NSALayerCache
from gatedfwa.ops.nsa.decode import decode_nsa_attention
from gatedfwa.ops.nsa.op import nsa_attention

__all__ = ["nsa_attention", "NSALayerCache", "decode_nsa_attention"]
