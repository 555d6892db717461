"""Process-group plumbing for multi-process training (``torchrun``), a no-op for one process.

``torchrun --nproc-per-node N -m gatedfwa.cli.main train ...`` (or the ``gatedfwa`` script)
sets RANK, LOCAL_RANK and WORLD_SIZE; :func:`init_distributed` reads them, joins the group
(NCCL on GPUs, gloo on CPUs) and picks this process's device. Data parallelism is DDP: every
process holds the whole model, computes its share of the global batch, and gradients are
averaged, so N processes follow the same loss curve as one process with the same global
batch. ``fsdp=True`` shards parameters and optimizer state instead (FSDP2, ``fully_shard``
on each decoder layer and on the root), for models too large to replicate.

Context parallelism (``context_parallel=N``, docs/distributed.md) arranges the processes in a
2-D DeviceMesh (data parallel, context parallel): the N ranks of a context-parallel group
take the same windows and hold one contiguous shard of each. Each rank's loss is scaled so
that its mean over the group is the loss of the whole windows (gatedfwa.distributed.sequence),
so the gradient mean over every process that DDP or FSDP2 takes (the mesh flattened) is
exactly the gradient of the global batch, as with data parallelism alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from gatedfwa import environment
from gatedfwa.errors import ConfigError
from gatedfwa.train.devices import resolve_device

__all__ = ["DistributedContext", "init_distributed", "init_context_parallel", "wrap_model"]


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # The (data parallel "dp", context parallel "cp") DeviceMesh when context_parallel > 1.
    mesh: object | None = field(default=None, repr=False)

    @property
    def data_rank(self) -> int:
        """This process's place among the data-parallel replicas (which windows it takes)."""
        return self.rank if self.mesh is None else self.mesh["dp"].get_local_rank()

    @property
    def data_size(self) -> int:
        """Data-parallel replicas: processes / context-parallel size."""
        return self.world_size if self.mesh is None else self.mesh["dp"].size()

    @property
    def context_parallel_size(self) -> int:
        return 1 if self.mesh is None else self.mesh["cp"].size()

    @property
    def context_parallel_group(self):
        """The process group this process's windows are split across (None without)."""
        return None if self.mesh is None else self.mesh["cp"].get_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64 on the wire)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def mean(self, value: float) -> float:
        return self.sum([value])[0] / self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> DistributedContext:
    world_size, rank, local_rank = environment.world_size(), environment.rank(), environment.local_rank()
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, device)


def init_context_parallel(ctx: DistributedContext, size: int) -> None:
    """Arrange the processes as a (world / size) x size DeviceMesh of (data parallel, context
    parallel) ranks; consecutive ranks share a context-parallel group. size 1: nothing."""
    if size == 1:
        return
    if ctx.world_size % size != 0:
        raise ConfigError(
            f"--context-parallel {size} must divide the number of processes ({ctx.world_size}); "
            f"launch with torchrun --nproc-per-node a multiple of {size}"
        )
    from torch.distributed.device_mesh import init_device_mesh

    ctx.mesh = init_device_mesh(ctx.device.type, (ctx.world_size // size, size), mesh_dim_names=("dp", "cp"))


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks of the longest ModuleList (the decoder layers of a transformer)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def wrap_model(model: nn.Module, ctx: DistributedContext, fsdp: bool) -> nn.Module:
    """DDP (or FSDP2 when ``fsdp``) around ``model`` when several processes run; else itself."""
    if not ctx.active:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise ConfigError("--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from None
        from torch.distributed.device_mesh import init_device_mesh

        # Every process, on this process's device type: fully_shard's default mesh follows the
        # machine's accelerator, so gloo processes on the CPU of a GPU machine would claim GPUs.
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

