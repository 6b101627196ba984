"""Compaction: the filled slots of the received buffer as rows grouped by local expert, and back.

After the dispatch all-to-all, an expert rank holds ``received [R, E_local, C, D]``: block
``(r, l)`` holds the slots source rank ``r`` filled for local expert ``l``, its first
``fill[r, l]`` slots (slots are assigned densely from 0, so the filled ones come first). The
experts need, for each local expert in turn, the filled rows of every source: rows ordered
``(l, r, c)`` with the filled ones first. That order is a permutation of the ``M = E_local * R *
C`` received rows (filled rows first, expert by expert, then every empty slot), so both
directions are gathers and every shape is static: nothing is read back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class _PermuteRows(torch.autograd.Function):
    """``x[order]`` whose backward is ``grad[inverse]``: both gathers (no index-add, no atomics)."""

    @staticmethod
    def forward(ctx, x_MD: Tensor, order_M: Tensor, inverse_M: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse_M)
        return x_MD.index_select(0, order_M)

    @staticmethod
    def backward(ctx, grad_MD: Tensor):  # type: ignore[override]
        (inverse_M,) = ctx.saved_tensors
        return grad_MD.index_select(0, inverse_M), None, None


@dataclass(frozen=True)
class ExpertRows:
    """How the received slots map to expert rows (a permutation, computed on the device).

    Attributes:
        order_M: received row (flat ``(r, l, c)``) of each expert row (flat ``(l, r, c)``
            order, filled rows first).
        inverse_M: expert row of each received row (the inverse permutation).
        offsets_L: end of each local expert's filled rows, cumulative, ``int32`` (what
            ``torch._grouped_mm`` takes as ``offs``); rows from ``offsets_L[-1]`` on are empty slots.
        expert_M: the local expert of every expert row; ``E_local`` (one past the last) for the
            empty rows, so a per-expert bias gathered with a zero row appended never sees them.
    """

    order_M: Tensor
    inverse_M: Tensor
    offsets_L: Tensor
    expert_M: Tensor

    def gather(self, received_RLCD: Tensor) -> Tensor:
        """``[R, E_local, C, D] -> [M, D]``: filled rows first, expert by expert. Differentiable."""
        flat_MD = received_RLCD.reshape(-1, received_RLCD.shape[-1])
        return _PermuteRows.apply(flat_MD, self.order_M, self.inverse_M)

    def scatter(self, rows_MD: Tensor, like_RLCD: Tensor) -> Tensor:
        """Inverse of ``gather``: ``[M, D] -> [R, E_local, C, D]`` (the shape of ``like_RLCD``)."""
        out_MD = _PermuteRows.apply(rows_MD, self.inverse_M, self.order_M)
        return out_MD.view(*like_RLCD.shape[:-1], rows_MD.shape[-1])


def expert_rows(fill_RL: Tensor, capacity: int) -> ExpertRows:
    """The permutation that compacts the received buffer, from the filled-slot counts.

    Args:
        fill_RL: filled slots per (source rank, local expert) ``[R, E_local]`` (long, on the
            device: what the counts all-to-all delivered).
        capacity: ``C``.

    Returns:
        ``ExpertRows``. No host sync.
    """
    num_sources, num_local = fill_RL.shape
    device = fill_RL.device
    fill_LR = fill_RL.t().reshape(-1)  # (l, r) order
    start_LR = torch.cumsum(fill_LR, 0) - fill_LR  # first expert row of each filled block
    total = fill_LR.sum()
    slot_C = torch.arange(capacity, device=device)
    flat_LRC = torch.arange(num_local * num_sources * capacity, device=device).view(-1, capacity)
    filled_LRC = slot_C < fill_LR.unsqueeze(1)
    # filled: after the earlier filled blocks; empty: after all filled rows, in (l, r, c) order
    dest_LRC = torch.where(filled_LRC, start_LR.unsqueeze(1) + slot_C,
                           total + flat_LRC - start_LR.unsqueeze(1) - fill_LR.unsqueeze(1))
    # received rows are (r, l, c)-major
    source_LRC = (torch.arange(num_sources, device=device).view(1, -1) * num_local
                  + torch.arange(num_local, device=device).view(-1, 1)).reshape(-1, 1) * capacity + slot_C
    order_M = torch.empty_like(flat_LRC).view(-1).scatter_(0, dest_LRC.view(-1), source_LRC.view(-1))
    inverse_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(order_M.numel(), device=device))
    ends_L = torch.cumsum(fill_RL.sum(dim=0), 0)
    expert_M = torch.searchsorted(ends_L, torch.arange(order_M.numel(), device=device), right=True)
    return ExpertRows(order_M, inverse_M, ends_L.to(torch.int32), expert_M)
