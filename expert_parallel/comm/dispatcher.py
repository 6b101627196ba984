"""Move the static expert buffer to the experts' ranks and back."""

from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.distributed import ProcessGroup

from .all_to_all import all_to_all


def dispatch(buffer_ECD: Tensor, ep_size: int, group: Optional[ProcessGroup]) -> Tensor:
    """Send each expert's slots to the rank that holds the expert.

    ``[E, C, D] = [R(dest), E_local, C, D]`` -all-to-all-> ``[R(source), E_local, C, D]``
    -> ``[E_local, R*C, D]``: every local expert sees the slots from every source rank.
    """
    num_experts, capacity, dim = buffer_ECD.shape
    local = num_experts // ep_size
    received = all_to_all(buffer_ECD.view(ep_size, local, capacity, dim), group)
    if ep_size == 1:
        return received.view(local, capacity, dim)
    return received.transpose(0, 1).reshape(local, ep_size * capacity, dim)


def undispatch(out_ELD: Tensor, ep_size: int, group: Optional[ProcessGroup]) -> Tensor:
    """Inverse of ``dispatch``: ``[E_local, R*C, D] -> [E, C, D]`` back on the source ranks."""
    local, rows, dim = out_ELD.shape
    capacity = rows // ep_size
    by_source = out_ELD.view(local, ep_size, capacity, dim).transpose(0, 1)
    returned = all_to_all(by_source, group)
    return returned.reshape(ep_size * local, capacity, dim)
