"""Run a function on N local processes joined in a gloo process group (CPU), the way torchrun
would on N GPUs: torch.multiprocessing spawn, rendezvous through a FileStore (no port to pick),
and a timeout on every collective so that a mistake fails instead of hanging the suite."""

from __future__ import annotations

import datetime
import os
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _entry(rank: int, world: int, store_path: str, fn, args, result_dir: str) -> None:
    # One thread per process: the machine running the suite may have as few as 2 cores.
    import torch

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        failures = fn(rank, world, *args)
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("exception:\n" + traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(world: int, fn, *args, tmp_path) -> list[str]:
    """Run fn(rank, world, *args) -> list of failure messages on `world` processes; return
    the failures of all ranks, each prefixed by its rank. An exception in any rank fails the
    caller (spawn ends the other processes)."""
    result_dir = tmp_path / f"results{world}"
    result_dir.mkdir()
    mp.spawn(_entry, args=(world, str(tmp_path / f"store{world}"), fn, args, str(result_dir)), nprocs=world, join=True)
    failures = []
    for rank in range(world):
        text = (result_dir / f"rank{rank}.txt").read_text()
        failures += [f"rank {rank}: {line}" for line in text.splitlines() if line]
    return failures
