"""Custom ops that exchange messages, marked so that torch.compile keeps them in program order
on every rank (compiled.py and fused.py build such ops)."""

from __future__ import annotations

__all__ = ["mark_ordered"]


def mark_ordered(op) -> None:
    """Mark a custom op as effectful (ordered): in the forward graph the compiler then neither
    drops it when its output looks unused (an empty halo still sends) nor moves it past
    another such op, so that every rank posts its messages in program order, whatever its own
    graph's shapes. (The backward graph carries no such order: compiled._carried says how
    the data orders it.)"""
    try:
        from torch._library.effects import EffectType
    except ImportError:  # older PyTorch
        from torch._higher_order_ops.effects import _EffectType as EffectType
    if hasattr(op, "register_effect"):
        op.register_effect(EffectType.ORDERED)
    else:
        from torch._higher_order_ops.effects import _register_effectful_op

        _register_effectful_op(op._qualname, EffectType.ORDERED)
