"""Attention across devices: context parallelism of the window op (docs/distributed.md).

    context_parallel.py  context_parallel_gated_window_attention: one sequence split across
                         the ranks of a process group; dispatches to fused.py on the
                         Triton backend, else composes the public op
    fused.py             the Triton path: the kernels and the halo exchange driven together,
                         owning their buffers (no full-size copies)
    compiled.py          under torch.compile: the communication as custom ops (the fused path
                         whole, the halo, the loss's messages)
    packed.py            packed sequences (cu_seqlens of the whole sequence): the offsets of
                         each call on a shard
    partial_sums.py      a gradient's parts from several calls and ranks, summed and rounded once
    sequence.py          a model's sequence across the group: shard_sequence, rotary offsets,
                         the token shift across shards, the loss (used by the layers and models)
    halo.py              the halo exchange: which ranks send which positions, and the
                         differentiable point-to-point exchange (torch.distributed)

Built on gatedfwa.ops; nothing in ops imports it.
"""

from gatedfwa.distributed.context_parallel import context_parallel_gated_window_attention
from gatedfwa.distributed.sequence import shard_sequence

__all__ = ["context_parallel_gated_window_attention", "shard_sequence"]
