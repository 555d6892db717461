"""Attention across devices: context parallelism of the window op (docs/distributed.md).

    context_parallel.py  context_parallel_gated_window_attention: one sequence split across
                         the ranks of a process group; dispatches to fused.py on the
                         Triton backend, else composes the public op
    fused.py             the Triton path: one autograd.Function that drives the kernels and
                         the halo exchange and owns its buffers (no full-size copies)
    sequence.py          a model's sequence across the group: shard_sequence, rotary offsets,
                         the token shift across shards, the loss (used by the layers and models)
    halo.py              the halo exchange: which ranks send which positions, and the
                         differentiable point-to-point exchange (torch.distributed)

Built on gatedfwa.ops; nothing in ops imports it.
"""

from gatedfwa.distributed.context_parallel import context_parallel_gated_window_attention
from gatedfwa.distributed.sequence import shard_sequence

__all__ = ["context_parallel_gated_window_attention", "shard_sequence"]
