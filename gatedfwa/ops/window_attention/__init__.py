"""Gated sliding-window attention (docs/math.md).

    naive.py        the float64 oracles of the tests: the quadratic op, the chunk sums, the
                    gate gradient's assembly
    torch_path.py   the chunked PyTorch path (every device without Triton)
    chunk_sums.py   the gates as the kernels read them: chunk-local sums, from g or from the
                    gate projection (chunk length: launch.py)
    tiles.py        device helpers: the gate's per-tile decay terms, tensor descriptors
    walk.py         the key-tile walk the forward and dq kernels share
    forward.py      Triton forward kernel and its launcher (the portable path and the reference)
    gluon_forward.py  warp-specialised Gluon forward kernel for Hopper (opt-in:
                    GATEDFWA_HOPPER_KERNELS=gluon; forward.py routes the calls it supports)
    backward.py     Triton backward kernels (dq, dk/dv, dg) and their launcher
    gate_flux.py    dg from the dq kernel's chunk-boundary fluxes
    launch.py       the family's TUNING (tile sizes per architecture; tuned.py: measured
                    entries), the gate chunk length, launch bookkeeping
    triton_path.py  the Triton path from g: forward and backward (context parallelism calls
                    these too)
    op.py           gated_window_attention: checks, dispatch, the Triton path as a KernelOp
    fused_gate.py   gated_fwa_attention: the gate and the attention as one op
"""

from gatedfwa.ops.window_attention.fused_gate import gated_fwa_attention
from gatedfwa.ops.window_attention.op import flash_gated_window_attention, gated_window_attention

__all__ = ["gated_window_attention", "flash_gated_window_attention", "gated_fwa_attention"]
