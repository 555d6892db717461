"""Gated sliding-window attention (docs/math.md).

    reference.py   naive (float64-capable) and chunked PyTorch paths
    tiles.py       device helpers: sequence bounds and the gate's per-tile decay terms
    walk.py        the key-tile walk the forward and dq kernels share
    forward.py     Triton forward kernel
    backward.py    Triton backward kernels (dq, dk/dv, dg)
    launch.py      tile sizes and launch bookkeeping
    op.py          gated_window_attention: checks, dispatch, custom ops with autograd
    fused_gate.py  gated_fwa_attention: the gate and the attention as one op
"""

from gatedfwa.ops.window_attention.fused_gate import gated_fwa_attention
from gatedfwa.ops.window_attention.op import flash_gated_window_attention, gated_window_attention

__all__ = ["gated_window_attention", "flash_gated_window_attention", "gated_fwa_attention"]
