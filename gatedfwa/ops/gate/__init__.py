"""The GatedFWA gate (docs/gate.md): g = logsigmoid(beta * a) / beta, beta = 1 + ELU(beta_pre).

    reference.py    the formula in PyTorch: naive, and the stable path CPUs take
    device_math.py  the formula as Triton device functions
    kernels.py      Triton kernels for g and its backward
    chunk_sums.py   chunk-local gate sums, the form the attention kernels read
    op.py           compute_log_gates, log_gates_from_projection: checks, dispatch, autograd
"""

from gatedfwa.ops.gate.op import compute_log_gates, log_gates_from_projection

__all__ = ["compute_log_gates", "log_gates_from_projection"]
