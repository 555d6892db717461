"""GATES: the gate parameterisations by name, and the lookups every op and the config use.

    GATES["sharpened"]   g = logsigmoid(beta a) / beta, beta = 1 + ELU(beta_pre)  (DEFAULT_GATE)
    GATES["forgetting"]  g = logsigmoid(a)

A gate defined outside gatedfwa joins with register_gate(spec) before a model or op names it
(docs/gate.md, "Adding a gate").
"""

from __future__ import annotations

from gatedfwa.ops.gate.kinds import forgetting, sharpened
from gatedfwa.ops.gate.spec import GateSpec

__all__ = ["GATES", "DEFAULT_GATE", "gate_spec", "register_gate"]

DEFAULT_GATE = "sharpened"

GATES: dict[str, GateSpec] = {spec.name: spec for spec in (sharpened.GATE, forgetting.GATE)}


def gate_spec(name: str) -> GateSpec:
    """The GateSpec registered as ``name``; ValueError listing the registered names otherwise."""
    spec = GATES.get(name) if isinstance(name, str) else None
    if spec is None:
        choices = "; ".join(f"{key!r}: {value.description}" for key, value in GATES.items())
        raise ValueError(f"unknown gate {name!r}; registered gates are {choices}")
    return spec


def register_gate(spec: GateSpec, replace: bool = False) -> GateSpec:
    """Add ``spec`` to GATES under spec.name (ValueError if taken, unless replace=True).
    Returns spec."""
    if not isinstance(spec, GateSpec):
        raise TypeError(f"register_gate takes a GateSpec, got {type(spec).__name__}")
    if spec.name in GATES and not replace:
        raise ValueError(f"a gate named {spec.name!r} is already registered; pass replace=True to replace it")
    GATES[spec.name] = spec
    return spec
