"""enable_context_parallel: run a GatedFWA model on sequences split across a process group
(docs/distributed.md, "In a model")."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from gatedfwa.layers.attention import GatedFWAttention
from gatedfwa.models.modeling import GatedFWAModel

__all__ = ["enable_context_parallel", "CONTEXT_PARALLEL_KINDS"]

# The kinds whose attention is the window op alone: their halo is the last window_size - 1
# tokens of the ranks before. (Window-free kinds would need the whole prefix; sparse kinds
# such as NSA select blocks anywhere in the prefix.)
CONTEXT_PARALLEL_KINDS = ("gatedfwa", "swa")


def enable_context_parallel(model: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Split every sequence of `model` (a GatedFWAForCausalLM or GatedFWAModel) across `group`;
    group=None turns it off. Returns the model.

    Then on rank r of the group (R ranks), input_ids [B, n] (and labels) hold positions
    [r * n, (r + 1) * n) of sequences of R * n tokens (gatedfwa.distributed.sequence.shard_sequence
    cuts them); rotary positions start at r * n; the windowed layers run
    context_parallel_gated_window_attention; the loss is this rank's part, whose mean over the
    group is the single-process loss (gradients alike). Every rank must run the same forward
    and backward. Padding masks, packed sequences and decoding caches are refused.

    Raises ValueError for a model with a layer of any other kind than CONTEXT_PARALLEL_KINDS
    (full, forgetting, NSA).
    """
    base = getattr(model, "model", model)
    if not isinstance(base, GatedFWAModel):
        raise TypeError(f"model must be a GatedFWAForCausalLM or GatedFWAModel, got {type(model).__name__}")
    if group is not None:
        unsupported = sorted({kind for kind in base.config.layer_kinds if kind not in CONTEXT_PARALLEL_KINDS})
        if unsupported:
            raise ValueError(
                f"context parallelism supports the windowed attention kinds {list(CONTEXT_PARALLEL_KINDS)} only; "
                f"this model has layers of kind {unsupported} (they read beyond a sliding window of the prefix)"
            )
    base.context_parallel_group = group
    for module in base.modules():
        if isinstance(module, GatedFWAttention):
            module.context_parallel_group = group
    return model
