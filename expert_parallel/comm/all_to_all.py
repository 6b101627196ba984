"""All-to-all as an autograd Function."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all over dim 0; its backward is the same all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _AllToAll.apply(grad, ctx.group), None


def all_to_all(x_RX: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Send block ``r`` of dim 0 to rank ``r`` of ``group``; receive block ``r`` from rank ``r``.

    Args:
        x_RX: ``[R, ...]`` with ``R`` the group size (dim 0 split evenly).
        group: the group; ``None`` means a single rank (identity).

    Returns:
        ``[R, ...]``, block ``r`` received from rank ``r``. Differentiable.
    """
    if group is None:
        return x_RX
    return _AllToAll.apply(x_RX, group)

