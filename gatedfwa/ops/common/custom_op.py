"""KernelOp: the one way an op family wraps its Triton path so that eager calls and compiled
graphs both differentiate through it (docs/layout.md).

From a forward and a backward written once as plain functions, it builds

    the forward custom op    torch.library.custom_op(name) + register_fake: torch.compile
                             sees one opaque node whose output shapes it knows
    the backward custom op   the same for the backward, named name + "_backward"
    the autograd formula     the backward op registered on the forward (register_autograd),
                             so that a compiled graph differentiates through the node
    the eager path           an autograd.Function with the same forward and backward, called
                             without the dispatcher: tens of microseconds less host time per
                             call than the custom op

and calling the KernelOp picks: the custom op while torch.compile traces, the Function in
eager calls that record a gradient, the forward itself when none is recorded (no_grad, or no
input requiring one: inference and decoding pay for no autograd bookkeeping). An op without
a backward (a decode step) is the forward custom op alone.

The functions are written once for both paths:

    forward(*inputs) -> output               the custom op's body: type annotations on every
                                             argument give its schema (tensors, None-able
                                             tensors, ints, floats, bools, strings)
    fake(*inputs) -> output                  empty tensors of the output's shapes
    backward(*saved) -> gradients            the backward custom op's body, annotated too;
                                             a custom op returns no None, so an absent
                                             gradient is an empty tensor (no_gradient)
    backward_fake(*saved) -> gradients
    save(ctx, inputs, output)                what the backward needs, saved on ctx (the
                                             setup_context of register_autograd)
    gradients(ctx, backward, *grad_outputs)  one gradient (or None) per input: calls
                                             backward, the custom op in compiled graphs and
                                             the plain function in eager calls. In eager
                                             calls an unused output's gradient arrives as
                                             None; in compiled graphs as zeros
    non_differentiable(inputs, output)       the outputs to mark non-differentiable in eager
                                             calls (default: none)

Inputs are passed positionally, every argument of forward, in both paths. Arguments that are
neither tensors nor such scalars (a process group, a layout object) cannot cross a custom op:
pass what they are made from (a name, the tensors and sizes) and rebuild them in the bodies.
Context parallelism (gatedfwa/distributed) may build its op the same way.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["KernelOp", "no_gradient"]


def no_gradient(like: torch.Tensor) -> torch.Tensor:
    """What a custom op returns in place of an absent gradient (its outputs cannot be None):
    an empty tensor on like's device."""
    return like.new_empty((0,))


def _records_gradient(inputs) -> bool:
    """Whether autograd would record a call on these inputs."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)


class KernelOp:
    """A custom op with its fake, its backward custom op and autograd, and the eager
    autograd.Function beside it; see the module docstring for the arguments.

    Attributes: ``op`` (the forward custom op), ``backward_op`` (the backward custom op, or
    None), ``function`` (the eager autograd.Function, or None without a backward).
    """

    def __init__(
        self,
        name: str,
        forward: Callable,
        fake: Callable,
        *,
        backward: Callable | None = None,
        backward_fake: Callable | None = None,
        save: Callable | None = None,
        gradients: Callable | None = None,
        non_differentiable: Callable | None = None,
        mutates_args: tuple[str, ...] = (),
    ):
        given = [part is not None for part in (backward, backward_fake, save, gradients)]
        if any(given) and not all(given):
            raise ValueError(f"{name}: backward, backward_fake, save and gradients go together")
        self.name = name
        self.forward = forward
        self.op = torch.library.custom_op(name, forward, mutates_args=mutates_args)
        self.op.register_fake(fake)
        self.backward_op = None
        self.function = None
        if backward is None:
            return
        self.backward_op = torch.library.custom_op(name + "_backward", backward, mutates_args=())
        self.backward_op.register_fake(backward_fake)
        backward_op = self.backward_op

        def compiled_backward(ctx, *grad_outputs):
            return gradients(ctx, backward_op, *grad_outputs)

        self.op.register_autograd(compiled_backward, setup_context=save)
        self.function = _eager_function(name, forward, backward, save, gradients, non_differentiable)

    def __call__(self, *inputs):
        if torch.compiler.is_compiling():
            return self.op(*inputs)
        if self.function is None or not _records_gradient(inputs):
            return self.forward(*inputs)
        return self.function.apply(*inputs)


def _eager_function(name, forward, backward, save, gradients, non_differentiable) -> type:
    """The autograd.Function of eager calls: forward and backward run as plain functions."""

    def function_forward(ctx, *inputs):
        output = forward(*inputs)
        save(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        if non_differentiable is not None:
            ctx.mark_non_differentiable(*non_differentiable(inputs, output))
        return output

    def function_backward(ctx, *grad_outputs):
        return gradients(ctx, backward, *grad_outputs)

    qualified = name.split("::")[-1]
    return type(f"Eager_{qualified}", (torch.autograd.Function,), {
        "__doc__": f"The eager path of {name}: its forward and backward without the dispatcher.",
        "forward": staticmethod(function_forward),
        "backward": staticmethod(function_backward),
    })
