"""Where the ranks come from: spawned local gloo ranks, or the ones torchrun started.

``launch(fn, ranks, *args)`` runs ``fn(rank, world, *args)`` on every rank and returns the list
of results on the caller (rank 0 under torchrun, ``None`` on the others). Without torchrun it
spawns ``ranks`` CPU gloo processes through ``expert_parallel.spawn.run_ranks``; under torchrun
(``RANK``/``WORLD_SIZE`` set) it joins the job with NCCL when CUDA is there (gloo otherwise) and
gathers the results to rank 0, so the same sweep runs unchanged on GPUs.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from expert_parallel.spawn import run_ranks

log = logging.getLogger(__name__)


MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 32),
                 "MALLOC_TOP_PAD_": str(2 ** 29)}


def tune_malloc() -> None:
    """Keep freed memory in glibc's heap in the ranks spawned from now on.

    glibc serves large buffers with fresh ``mmap`` pages and returns them on free, so a layer that
    allocates large stacked activations every step page-faults them in again every step; the
    same layer written as many small per-expert tensors does not. The variables are read by glibc
    when a process starts, so they apply to spawned ranks, both runtimes alike. ``LD_PRELOAD`` of
    jemalloc or tcmalloc does the same for a training job.
    """
    os.environ.update(MALLOC_TUNING)


def malloc_tuned() -> bool:
    """Whether this process started with ``tune_malloc``'s settings."""
    return all(os.environ.get(name) == value for name, value in MALLOC_TUNING.items())


def under_torchrun() -> bool:
    """True when torchrun (or a launcher like it) set this process's rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def bench_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is there and NCCL runs, else the CPU."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launch(fn: Callable, ranks: int, *args: Any, timeout: float = 1800.0,
           threads_per_rank: int = 1) -> Optional[list[Any]]:
    """Run ``fn(rank, world, *args)`` on every rank; results ordered by rank (on rank 0 only)."""
    if not under_torchrun():
        return run_ranks(fn, ranks, *args, timeout=timeout, threads_per_rank=threads_per_rank)
    world = int(os.environ["WORLD_SIZE"])
    if world != ranks:
        log.warning("torchrun started %d ranks; --ranks %d is ignored", world, ranks)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        rank = dist.get_rank()
        result = fn(rank, world, *args)
        gathered: list[Any] = [None] * world
        dist.gather_object(result, gathered if rank == 0 else None, dst=0)
        return gathered if rank == 0 else None
    finally:
        dist.destroy_process_group()


def world_sizes(requested: list[int]) -> list[int]:
    """The rank counts a sweep visits: all of them locally, only torchrun's under torchrun."""
    return [int(os.environ["WORLD_SIZE"])] if under_torchrun() else requested
