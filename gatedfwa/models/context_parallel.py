"""enable_context_parallel: run a GatedFWA model on sequences split across a process group
(docs/distributed.md, "In a model")."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from gatedfwa.attention_kinds import ATTENTION_KINDS, attention_kind
from gatedfwa.models.modeling import GatedFWAModel

__all__ = ["enable_context_parallel"]


def enable_context_parallel(model: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Split every sequence of `model` (a GatedFWAForCausalLM or GatedFWAModel) across `group`;
    group=None turns it off. Returns the model.

    Then on rank r of the group (R ranks), input_ids [B, n] (and labels) hold positions
    [r * n, (r + 1) * n) of sequences of R * n tokens (gatedfwa.distributed.sequence.shard_sequence
    cuts them); rotary positions start at r * n; the windowed layers run
    context_parallel_gated_window_attention; the loss is this rank's part, whose mean over the
    group is the single-process loss (gradients alike). Every rank must run the same forward
    and backward. Packed sequences (batch 1) go in as cu_seq_lens_q/k, the offsets of the
    whole sequence, the same on every rank: positions, token shift and attention stay within
    each sequence across the shards. Padding masks and decoding caches are refused. Under
    torch.compile the communication runs in custom ops (gatedfwa/distributed/compiled.py), so
    a compiled forward and backward has no graph break for it.

    Raises ValueError for a model with a layer of a kind whose registry entry does not
    support context parallelism (gatedfwa/attention_kinds.py: of the built-in kinds, only
    "gatedfwa" and "swa" do; full, forgetting and NSA read beyond a sliding window).
    """
    base = getattr(model, "model", model)
    if not isinstance(base, GatedFWAModel):
        raise TypeError(f"model must be a GatedFWAForCausalLM or GatedFWAModel, got {type(model).__name__}")
    if group is not None:
        unsupported = sorted({kind for kind in base.config.layer_kinds
                              if not attention_kind(kind).supports_context_parallel})
        if unsupported:
            supported = [name for name, kind in ATTENTION_KINDS.items() if kind.supports_context_parallel]
            raise ValueError(
                f"context parallelism supports the attention kinds {supported} only; this model has layers "
                f"of kind {unsupported} (e.g. the window-free and NSA kinds read beyond a sliding window of the prefix)"
            )
    base.context_parallel_group = group
    for block in base.layers:
        # The attribute the layers of a kind that supports context parallelism read.
        block.attn.context_parallel_group = group
    return model
