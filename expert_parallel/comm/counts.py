"""Sums of small count vectors over the ranks (routing statistics, global balance losses)."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .agreement import device_for_backend


def sum_over_ranks(values: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """``values`` summed over the ranks of ``group`` (one all-reduce; a copy, no autograd).

    No host read: the all-reduce runs on the values' device where the backend serves it (a CPU
    copy for gloo). ``values`` itself is left alone, and returned as is without an initialised
    process group or with a group of one rank.

    Args:
        values: any shape (counts ``[E]``, or several layers' counts concatenated).
        group: the ranks to sum over; ``None`` means the world.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return values
    where = device_for_backend(str(dist.get_backend(group)), values.device)
    reduced = values.detach().to(where, copy=True)
    dist.all_reduce(reduced, group=group)
    return reduced.to(values.device)
