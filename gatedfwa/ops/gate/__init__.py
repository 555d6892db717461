"""The gate: from the gate projection to the log gates g the attention takes (docs/gate.md).

A gate is a GateSpec, registered by name in GATES: "sharpened" (the default,
g = logsigmoid(beta * a) / beta, beta = 1 + ELU(beta_pre)) and "forgetting" (g = logsigmoid(a)).

    spec.py         GateSpec: a gate's inputs per head, formula forms, device functions, bias init
    registry.py     GATES, DEFAULT_GATE, gate_spec(name), register_gate(spec)
    kinds/          one module per shipped gate (sharpened.py, forgetting.py): its formula,
                    its stable PyTorch forms, its device functions
    bias_init.py    the initial gate bias from a range of retentions
    naive.py        the float64 oracle of the tests: any gate's formula, from its inputs or
                    from the projection
    torch_path.py   any gate's PyTorch path (value and backward) from its GateSpec
    device_math.py  the sharpened gate as Triton device functions; exp and log1p for all gates
    kernels.py      Triton kernels for g and its backward, for any GateSpec, and their launchers
    launch.py       the kernels' block sizes, warps and output buffers
    op.py           compute_log_gates, log_gates_from_projection: checks, dispatch, custom ops

The attention kernels read the gates as chunk-local sums, made beside them
(gatedfwa/ops/window_attention/chunk_sums.py) from g or straight from the gate projection.
"""

from gatedfwa.ops.gate.op import compute_log_gates, log_gates_from_projection
from gatedfwa.ops.gate.registry import DEFAULT_GATE, GATES, gate_spec, register_gate
from gatedfwa.ops.gate.spec import GateSpec

__all__ = ["compute_log_gates", "log_gates_from_projection", "GATES", "DEFAULT_GATE", "GateSpec", "gate_spec",
           "register_gate"]
