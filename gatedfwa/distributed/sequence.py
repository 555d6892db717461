"""A model's sequence split across a context-parallel group: what the layers and the loss need
besides the attention op (docs/distributed.md, "In a model").

Rank r of the group holds positions [r * n, (r + 1) * n) of every sequence of R * n tokens
(rank order is sequence order), for the inputs, every hidden state and the labels alike.
Everything that acts on one position at a time (embeddings, norms, MLPs, projections, the
head) runs unchanged on the shard; three things look across a shard boundary and live here:

    shard_start                   rotary positions continue from the shards before
    previous_token_across_shards  the token shift reads the previous rank's last token
    context_parallel_causal_lm_loss  the label of a shard's last token is the next shard's
                                  first label, and the mean runs over every rank's tokens
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gatedfwa.distributed.halo import HaloPlan, attach_halo, start_halo_exchange

__all__ = [
    "shard_sequence",
    "shard_start",
    "previous_token_across_shards",
    "context_parallel_causal_lm_loss",
    "refuse_under_context_parallel",
]

IGNORE_INDEX = -100


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of x along `dim` (the sequence): x [B, R * n, ...] ->
    [B, n, ...], positions [r * n, (r + 1) * n). The length must divide evenly."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    length = x.shape[dim]
    if length % world != 0:
        raise ValueError(
            f"the sequence length ({length}) must be a multiple of the context-parallel group's size "
            f"({world}): every rank holds a shard of the same length"
        )
    n = length // world
    return x.narrow(dim, rank * n, n)


def shard_start(shard_length: int, group: dist.ProcessGroup | None) -> int:
    """Global position of this rank's first token: rank * shard_length (0 without a group)."""
    return 0 if group is None else dist.get_rank(group) * shard_length


def previous_token_across_shards(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The previous token's value at every position of this rank's shard x [B, n, ...]: the
    previous rank's last token at position 0 (zero on the group's first rank, where the
    sequence starts). Differentiable: the gradient of the received token goes back to its
    owner (a halo of one position, gatedfwa/distributed/halo.py)."""
    plan = HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), x.shape[1], 1)
    halo = attach_halo(start_halo_exchange(plan, group, [x]), [x])[0]  # [B, 1, ...], or [B, 0, ...] on rank 0
    if halo.shape[1] == 0:
        # The sequence starts here: a zero. The empty halo stays in the graph, since every
        # rank must run the exchange's backward.
        halo = torch.cat((halo, torch.zeros_like(x[:, :1])), dim=1)
    return torch.cat((halo, x[:, :-1]), dim=1)


def _next_shard_first_labels(labels: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, 1]: the first label of the next rank's shard (IGNORE_INDEX on the last rank, whose
    last token has no successor)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    received = torch.full_like(labels[:, :1], IGNORE_INDEX).contiguous()
    ops = []
    if rank > 0:
        ops.append(dist.P2POp(dist.isend, labels[:, :1].contiguous(), dist.get_global_rank(group, rank - 1), group))
    if rank < world - 1:
        ops.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(group, rank + 1), group))
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    return received


def context_parallel_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's part of the next-token cross-entropy of sequences split across `group`.

    Args:
        logits: [B, n, vocab] of this rank's shard.
        labels: [B, n] this rank's shard of the labels, aligned with its input_ids (not shifted:
            position t predicts labels[t + 1], the last position the next shard's first label);
            -100 is ignored.

    Returns:
        A scalar (float32) whose mean over the group's ranks, value and gradient alike, is the
        mean cross-entropy over the tokens of all ranks, i.e. the single-process loss:
        R * (this rank's sum) / (token count of all ranks). Averaging gradients over the group
        (as data parallelism averages them) therefore gives the single-process gradients.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape [batch, shard length] = {list(logits.shape[:2])}, got {list(labels.shape)}")
    labels = labels.to(logits.device)
    targets = torch.cat((labels[:, 1:], _next_shard_first_labels(labels, group)), dim=1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum().to(torch.float32)
    dist.all_reduce(count, group=group)  # a count, no gradient
    # Like F.cross_entropy's mean, 0 / 0 = nan when no rank holds a label.
    return total * dist.get_world_size(group) / count


def refuse_under_context_parallel(**arguments) -> None:
    """Raise a ValueError naming the first argument given (not None) that context parallelism
    does not support: padding masks, packed sequences and decoding caches."""
    given = [name for name, value in arguments.items() if value is not None]
    if given:
        raise ValueError(
            f"{given[0]} is not supported under context parallelism: each rank must hold a contiguous "
            "shard of unpadded, unpacked sequences (no attention_mask, cu_seqlens, layout or cache); "
            "call enable_context_parallel(model, None) to run without it"
        )
