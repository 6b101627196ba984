"""The tensor-parallel (TP) edges of the layer, as autograd functions over the TP group.

The ranks of a TP group hold the same tokens. ``tp_drop`` keeps this rank's share of a dimension
(the expert slots) and ``tp_gather`` puts the shares together again: DeepSpeed's ``drop_tokens`` /
``gather_tokens`` (Megatron's scatter / gather mappings), each the other's backward. Around experts
split over the TP group, ``tp_copy`` (identity; all-reduce of the gradient) and ``tp_reduce``
(all-reduce of the partial outputs; identity backward) are Megatron's ``f`` and ``g``. Every
function is the identity when ``group`` is ``None`` (one rank); none syncs the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .gather import all_gather_along
from .groups import held


def _share(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    """This rank's block of ``dim``, split evenly over ``group`` in rank order."""
    size = dist.get_world_size(group)
    return x.narrow(dim, dist.get_rank(group) * (x.shape[dim] // size), x.shape[dim] // size)


class _Drop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, held(group)
        return _share(x, dim, group).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return all_gather_along(grad, ctx.dim, ctx.group()), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, held(group)
        return all_gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _share(grad, ctx.dim, ctx.group()).contiguous(), None, None


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = held(group)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group())
        return grad, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def tp_drop(x: Tensor, dim: int, group: Optional[ProcessGroup]) -> Tensor:
    """This TP rank's share of ``dim``: ``[..., n, ...] -> [..., n / tp, ...]`` (block ``rank`` of
    ``tp`` equal blocks; ``n`` must be divisible by ``tp``). Backward: all-gather of the gradient."""
    return x if group is None else _Drop.apply(x, dim, group)


def tp_gather(x: Tensor, dim: int, group: Optional[ProcessGroup]) -> Tensor:
    """Every TP rank's share concatenated along ``dim`` in rank order: ``[..., n, ...] ->
    [..., tp * n, ...]`` (one all-gather). Backward: this rank's share of the gradient."""
    return x if group is None else _Gather.apply(x, dim, group)


def tp_copy(x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Identity into a TP-split computation; the backward sums the partial input gradients of
    the TP ranks (one all-reduce)."""
    return x if group is None else _Copy.apply(x, group)


def tp_reduce(x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """The sum over the TP group of the partial outputs ``x`` (one all-reduce, same shape); the
    backward passes the gradient through (every TP rank holds the full output gradient)."""
    return x if group is None else _Reduce.apply(x, group)
