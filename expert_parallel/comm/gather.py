"""Gathers: for saving and checkpointing (never in a forward), every EP rank's expert shard and every
rank's small Python object; and the all-gather along a dimension both are made of, which the
forward's tensor-parallel gather (``tensor_parallel.tp_gather``) also runs, with its backward."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def gather_experts(shard_LX: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Every EP rank's experts in EP-rank order: ``[E_local, ...] -> [E, ...]`` on every rank.

    Global expert ``e`` is local expert ``e % E_local`` of EP rank ``e // E_local``, so the
    shards concatenated in the group's rank order are the layer's experts by global id. One
    all-gather (every rank of ``group`` must call it, with shards of one shape and dtype); not
    differentiable.

    Args:
        shard_LX: this rank's experts, ``[E_local, ...]``.
        group: the EP group; ``None`` means a single rank (the shard itself is returned).
    """
    if group is None:
        return shard_LX
    return all_gather_along(shard_LX.detach(), 0, group)


def all_gather_along(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    """Every rank's ``x`` (one shape and dtype on all) concatenated along ``dim`` in the group's
    rank order: one all-gather; not differentiable (``comm.tp_gather`` is)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def gather_objects(value: Any, group: Optional[ProcessGroup] = None) -> list[Any]:
    """Every rank's picklable ``value``, in rank order (one object all-gather over ``group``, by
    default the world, which must then hold every rank; ``[value]`` without a process group).
    Collective; syncs the host."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values
