"""Native Sparse Attention (arXiv 2502.11089) with GatedFWA as its sliding branch.

    from gatedfwa.ops.nsa import nsa_attention

Files: op.py (public entry, dispatch), validation.py (argument checks), reference.py (the
quadratic specification), chunked.py (PyTorch path with bounded memory), sliding.py (the
window op as the sliding branch), and the Triton path: pooling.py (block summaries),
compressed.py, selection.py, selected.py and selected_block_major.py (kernels), autograd.py
(their composition).
Decoding: cache.py (NSALayerCache: window ring buffer, every key/value, block summaries) and
decode.py (decode_nsa_attention, the step in PyTorch).
docs/nsa.md describes the math.
"""

from gatedfwa.ops.nsa.cache import NSALayerCache
from gatedfwa.ops.nsa.decode import decode_nsa_attention
from gatedfwa.ops.nsa.op import nsa_attention

__all__ = ["nsa_attention", "NSALayerCache", "decode_nsa_attention"]
