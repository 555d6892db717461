"""Pure functions on tensors (no nn.Module), one package per op family:

    window_attention/  gated sliding-window attention: the op, the op fused with the gate
                       (from the gate projection to the output), and the chunk gate sums its
                       kernels read
    gate/              the gate: its registry of parameterisations, log gates from the projections
    decode/            decode steps against the bounded window cache
    nsa/               Native Sparse Attention with the gated window as its sliding branch

Each family follows one plan (docs/layout.md): naive.py (the float64 oracle of the tests),
torch_path.py (the PyTorch path), the Triton kernels, launch.py (their configuration) and
op.py (the public face; its __init__ exports it). Shared by all: backend.py (which
implementation serves a call) and common/ (KernelOp, the online softmax, Triton support,
packed sequences, argument checks).
"""

from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.decode import (
    MAX_DECODE_LENGTH,
    StaticWindowCache,
    StaticWindowLayerCache,
    WindowCache,
    WindowLayerCache,
    decode_gated_window_attention,
    decode_static_step,
)
from gatedfwa.ops.gate import compute_log_gates, log_gates_from_projection
from gatedfwa.ops.nsa import nsa_attention
from gatedfwa.ops.window_attention import flash_gated_window_attention, gated_fwa_attention, gated_window_attention

__all__ = [
    "gated_window_attention",
    "flash_gated_window_attention",
    "gated_fwa_attention",
    "compute_log_gates",
    "log_gates_from_projection",
    "nsa_attention",
    "decode_gated_window_attention",
    "WindowCache",
    "WindowLayerCache",
    "StaticWindowCache",
    "StaticWindowLayerCache",
    "decode_static_step",
    "MAX_DECODE_LENGTH",
    "use_backend",
]
