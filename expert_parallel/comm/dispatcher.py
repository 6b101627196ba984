"""Move the static expert buffer to the experts' ranks and back.

``exchange`` / ``exchange_back`` are the all-to-alls alone (``[E, C, D] = [R(dest), E_local, C,
D] <-> [R(source), E_local, C, D]``); ``exchange_fill`` tells each expert rank how many slots of
every block are filled; ``dispatch`` / ``undispatch`` add the transpose to and from the padded
per-expert layout ``[E_local, R*C, D]``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.distributed import ProcessGroup

from .all_to_all import all_to_all


def exchange(buffer_ECD: Tensor, ep_size: int, group: Optional[ProcessGroup]) -> Tensor:
    """Send each expert's slots to the rank that holds the expert: ``[E, C, D] -> [R(source),
    E_local, C, D]``. Differentiable (the backward is the reverse all-to-all); no host sync."""
    num_experts, capacity, dim = buffer_ECD.shape
    return all_to_all(buffer_ECD.view(ep_size, num_experts // ep_size, capacity, dim), group)


def exchange_back(out_RLCD: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """Inverse of ``exchange``: ``[R(source), E_local, C, D] -> [E, C, D]`` back on the sources."""
    ep_size, local, capacity, dim = out_RLCD.shape
    return all_to_all(out_RLCD, group).view(ep_size * local, capacity, dim)


def exchange_fill(fill_E: Tensor, ep_size: int, group: Optional[ProcessGroup]) -> Tensor:
    """Filled slots per expert ``[E]`` (this rank's) ``-> [R(source), E_local]``: how many slots of
    every received block are filled. One tiny all-to-all (``E`` integers); no host sync."""
    return all_to_all(fill_E.view(ep_size, -1), group)


def dispatch(buffer_ECD: Tensor, ep_size: int, group: Optional[ProcessGroup]) -> Tensor:
    """``exchange``, then every local expert's slots from every source rank in one block:
    ``[E, C, D] -> [E_local, R*C, D]`` (a transpose copy; a view when ``R == 1``)."""
    received = exchange(buffer_ECD, ep_size, group)
    _, local, capacity, dim = received.shape
    return received.transpose(0, 1).reshape(local, ep_size * capacity, dim)


def undispatch(out_ELD: Tensor, ep_size: int, group: Optional[ProcessGroup]) -> Tensor:
    """Inverse of ``dispatch``: ``[E_local, R*C, D] -> [E, C, D]`` back on the source ranks."""
    local, rows, dim = out_ELD.shape
    by_source = out_ELD.view(local, ep_size, rows // ep_size, dim).transpose(0, 1)
    return exchange_back(by_source.contiguous(), group)
