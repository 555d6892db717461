"""A model's sequence split across a context-parallel group: what the layers and the loss need
besides the attention op (docs/distributed.md, "In a model").

Rank r of the group holds positions [r * n, (r + 1) * n) of every sequence of R * n tokens
(rank order is sequence order), for the inputs, every hidden state and the labels alike.
Everything that acts on one position at a time (embeddings, norms, MLPs, projections, the
head) runs unchanged on the shard; three things look across a shard boundary and live here:

    shard_start                   rotary positions continue from the shards before
    packed_shard_position_ids     ... or from the start of each packed sequence
    previous_tokens_across_shards the token shift reads the previous rank's last token
    context_parallel_causal_lm_loss  the label of a shard's last token is the next shard's
                                  first label, and the mean runs over every rank's tokens
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gatedfwa.distributed.compiled import compiled_group_sum, compiled_halo, compiled_next_first_labels
from gatedfwa.distributed.halo import HaloPlan, attach_halo, start_halo_exchange

__all__ = [
    "shard_sequence",
    "shard_start",
    "packed_shard_position_ids",
    "previous_tokens_across_shards",
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


def _whole_positions(shard_length: int, group: dist.ProcessGroup, device) -> torch.Tensor:
    """[n] the whole-sequence positions of this rank's shard."""
    start = shard_start(shard_length, group)
    return torch.arange(start, start + shard_length, device=device)


def packed_shard_position_ids(cu_seqlens: torch.Tensor, shard_length: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[1, n] rotary positions of this rank's shard of packed sequences: each token's
    distance from the start of its sequence, cu_seqlens [N + 1] delimiting the sequences of
    the whole sequence of R * n tokens (a sequence that started on an earlier rank
    continues its count)."""
    positions = _whole_positions(shard_length, group, cu_seqlens.device)
    cu = cu_seqlens.to(positions.dtype)
    starts = cu[torch.searchsorted(cu, positions, right=True) - 1]
    return (positions - starts)[None]


def previous_tokens_across_shards(tensors: list[torch.Tensor], group: dist.ProcessGroup,
                                  cu_seqlens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The previous token's value at every position of this rank's shard, for each of
    tensors [B, n, ...] (the token shift's k and v, exchanged together): the previous rank's
    last token at position 0 (zero on the group's first rank, where the sequence starts), and
    zero where a packed sequence starts (cu_seqlens [N + 1] of the whole sequence, B == 1).
    Differentiable: the gradient of the received token goes back to its owner (a halo of one
    position, gatedfwa/distributed/halo.py)."""
    if torch.compiler.is_compiling():
        halos = compiled_halo(tensors, group, 1)
    else:
        plan = HaloPlan.build(dist.get_rank(group), dist.get_world_size(group), tensors[0].shape[1], 1)
        halos = attach_halo(start_halo_exchange(plan, group, tensors), tensors)  # [B, 1 or 0 on rank 0, ...]
    previous = []
    for x, halo in zip(tensors, halos):
        # On the group's first rank the halo is empty and the sequence starts with a zero; the
        # empty halo stays in the graph, since every rank must run the exchange's backward.
        # The same operations on every rank, whatever the halo's length: the order in which
        # autograd reaches the exchanges' backwards follows the graph's structure, and must
        # be the same on every rank.
        start = torch.zeros_like(x[:, :1 - halo.shape[1]])
        shifted = torch.cat((start, halo, x[:, :-1]), dim=1)
        if cu_seqlens is not None:
            starts = torch.isin(_whole_positions(x.shape[1], group, x.device), cu_seqlens.to(x.device))
            shifted = shifted.masked_fill(starts.view(1, -1, *([1] * (x.dim() - 2))), 0.0)
        previous.append(shifted)
    return previous


def next_shard_first_labels(labels: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
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
    compiling = torch.compiler.is_compiling()
    following = compiled_next_first_labels(labels, group) if compiling else next_shard_first_labels(labels, group)
    targets = torch.cat((labels[:, 1:], following), dim=1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum().to(torch.float32)
    if compiling:
        count = compiled_group_sum(count, group)
    else:
        dist.all_reduce(count, group=group)  # a count, no gradient
    # Like F.cross_entropy's mean, 0 / 0 = nan when no rank holds a label.
    return total * dist.get_world_size(group) / count


def refuse_under_context_parallel(**arguments) -> None:
    """Raise a ValueError naming the first argument given (not None) that context parallelism
    does not support: padding masks and decoding caches (packed sequences are given as
    cu_seqlens of the whole sequence instead)."""
    given = [name for name, value in arguments.items() if value is not None]
    if given:
        raise ValueError(
            f"{given[0]} is not supported under context parallelism: each rank must hold a contiguous "
            "shard of unpadded sequences (no attention_mask, layout or cache; packed sequences go in as "
            "cu_seqlens of the whole sequence); call enable_context_parallel(model, None) to run without it"
        )
