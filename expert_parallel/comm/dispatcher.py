"""Move the static expert buffer to the experts' ranks and back.

``exchange`` / ``exchange_back`` are the all-to-alls alone (``[E, C, D] = [R(dest), E_local, C,
D] <-> [R(source), E_local, C, D]``); ``exchange_start`` / ``exchange_back_start`` start them
asynchronously (for chunked overlap); ``exchange_fill`` tells each expert rank how many slots of
every block are filled; ``by_expert`` / ``by_source`` transpose to and from the padded per-expert
layout ``[E_local, R*C, D]``.

``group`` is the EP process group, a ``Hierarchy`` of it (hierarchical all-to-all, the same
result), or ``None`` for a single rank.
"""

from __future__ import annotations

from torch import Tensor

from .all_to_all import A2AGroup, PendingAllToAll, all_to_all, all_to_all_start


def _by_destination(buffer_ECD: Tensor, ep_size: int) -> Tensor:
    num_experts, capacity, dim = buffer_ECD.shape
    return buffer_ECD.reshape(ep_size, num_experts // ep_size, capacity, dim)


def exchange(buffer_ECD: Tensor, ep_size: int, group: A2AGroup) -> Tensor:
    """Send each expert's slots to the rank that holds the expert: ``[E, C, D] -> [R(source),
    E_local, C, D]``. Differentiable (the backward is the reverse all-to-all); no host sync."""
    return all_to_all(_by_destination(buffer_ECD, ep_size), group)


def exchange_start(buffer_ECD: Tensor, ep_size: int, group: A2AGroup, async_op: bool = True) -> PendingAllToAll:
    """``exchange`` started (``async_op``: asynchronously, else it completes before this
    returns); ``.wait()`` gives ``[R(source), E_local, C, D]``. No host sync."""
    return all_to_all_start(_by_destination(buffer_ECD, ep_size), group, async_op)


def exchange_back(out_RLCD: Tensor, group: A2AGroup) -> Tensor:
    """Inverse of ``exchange``: ``[R(source), E_local, C, D] -> [E, C, D]`` back on the sources."""
    ep_size, local, capacity, dim = out_RLCD.shape
    return all_to_all(out_RLCD, group).view(ep_size * local, capacity, dim)


def exchange_back_start(out_RLCD: Tensor, group: A2AGroup, async_op: bool = True) -> PendingAllToAll:
    """``exchange_back`` started; ``.wait()`` gives ``[R(dest), E_local, C, D]`` on the sources
    (view it as ``[E, C, D]``). No host sync."""
    return all_to_all_start(out_RLCD, group, async_op)


def exchange_fill(fill_E: Tensor, ep_size: int, group: A2AGroup) -> Tensor:
    """Filled slots per expert ``[E]`` (this rank's) ``-> [R(source), E_local]``: how many slots of
    every received block are filled. One tiny all-to-all (``E`` integers); no host sync."""
    return all_to_all(fill_E.view(ep_size, -1), group)


def by_expert(received_RLCD: Tensor) -> Tensor:
    """Every local expert's slots from every source rank in one block: ``[R, E_local, C, D] ->
    [E_local, R*C, D]`` (a transpose copy; a view when ``R == 1``)."""
    ep_size, local, capacity, dim = received_RLCD.shape
    return received_RLCD.transpose(0, 1).reshape(local, ep_size * capacity, dim)


def by_source(out_LMD: Tensor, ep_size: int) -> Tensor:
    """Inverse of ``by_expert``: ``[E_local, R*C, D] -> [R, E_local, C, D]`` (contiguous)."""
    local, rows, dim = out_LMD.shape
    return out_LMD.view(local, ep_size, rows // ep_size, dim).transpose(0, 1).contiguous()

