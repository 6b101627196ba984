"""Compaction: the filled slots of the received buffer as rows grouped by local expert, and back.

After the dispatch all-to-all, an expert rank holds ``received [R, E_local, C, D]``: block
``(r, l)`` holds the slots source rank ``r`` filled for local expert ``l``, its first
``fill[r, l]`` slots (slots are assigned densely from 0, so the filled ones come first). The
experts need, for each local expert in turn, the filled rows of every source: rows ordered
``(l, r, c)`` with the filled ones first. That order is a permutation of the ``M = E_local * R *
C`` received rows (filled rows first, expert by expert, then every empty slot), so both
directions are gathers and every shape is static: nothing is read back to the host.

Where the counts live in host memory (the CPU) reading them costs no device sync, so there the
rows are cut to exactly the filled ones: the gather, the experts' element-wise work and the way
back touch ``T`` filled rows, not all ``M``. On an accelerator, and while ``torch.compile``
traces, the static permutation above is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .workspace import Workspace, scratch


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


class _FilledRows(torch.autograd.Function):
    """``x[order]`` for the ``T`` filled rows of ``M``; the backward puts the gradient back in
    their rows and zeros in the empty ones (one pass over the rows each way)."""

    @staticmethod
    def forward(ctx, x_MD: Tensor, order_T: Tensor, workspace: Optional[Workspace]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(order_T)
        ctx.num_rows, ctx.workspace = x_MD.shape[0], workspace
        return x_MD.index_select(0, order_T)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):  # type: ignore[override]
        (order_T,) = ctx.saved_tensors
        grad_MD = scratch(ctx.workspace, "received grad", (ctx.num_rows, grad_TD.shape[1]), grad_TD)
        return grad_MD.zero_().index_copy_(0, order_T, grad_TD), None, None


class _PlaceRows(torch.autograd.Function):
    """The inverse of ``_FilledRows``: the ``T`` rows into their places of ``M`` rows; the empty
    rows are left unspecified (the combine never reads them)."""

    @staticmethod
    def forward(ctx, rows_TD: Tensor, order_T: Tensor, num_rows: int,  # type: ignore[override]
                workspace: Optional[Workspace]) -> Tensor:
        ctx.save_for_backward(order_T)
        out_MD = scratch(workspace, "expert output", (num_rows, rows_TD.shape[1]), rows_TD)
        return out_MD.index_copy_(0, order_T, rows_TD).view_as(out_MD)  # a view: the cache's tensor keeps no history

    @staticmethod
    def backward(ctx, grad_MD: Tensor):  # type: ignore[override]
        (order_T,) = ctx.saved_tensors
        return grad_MD.index_select(0, order_T), None, None, None


@dataclass(frozen=True)
class ExpertRows:
    """How the received slots map to expert rows (a permutation, computed on the device).

    Attributes:
        order_M: received row (flat ``(r, l, c)``) of each expert row (flat ``(l, r, c)``
            order, filled rows first); on the host path (see the module) only the ``T`` filled
            rows, ``order_T``.
        inverse_M: expert row of each received row (the inverse permutation); ``None`` on the
            host path.
        offsets_L: end of each local expert's filled rows, cumulative, ``int32`` (what
            ``torch._grouped_mm`` takes as ``offs``); rows from ``offsets_L[-1]`` on are empty slots.
        expert_M: the local expert of every expert row; ``E_local`` (one past the last) for the
            empty rows, so a per-expert bias gathered with a zero row appended never sees them.
    """

    order_M: Tensor
    inverse_M: Optional[Tensor]
    offsets_L: Tensor
    expert_M: Tensor

    def gather(self, received_RLCD: Tensor, workspace: Optional[Workspace] = None) -> Tensor:
        """``[R, E_local, C, D] -> [M, D]`` (``[T, D]`` on the host path): filled rows first,
        expert by expert. Differentiable; ``workspace`` holds the backward's ``[M, D]`` gradient."""
        flat_MD = received_RLCD.reshape(-1, received_RLCD.shape[-1])
        if self.inverse_M is None:
            return _FilledRows.apply(flat_MD, self.order_M, workspace)
        return _PermuteRows.apply(flat_MD, self.order_M, self.inverse_M)

    def scatter(self, rows_MD: Tensor, like_RLCD: Tensor, workspace: Optional[Workspace] = None) -> Tensor:
        """Inverse of ``gather``: ``[M, D] -> [R, E_local, C, D]`` (the shape of ``like_RLCD``);
        on the host path the empty slots are unspecified, and ``workspace`` holds the output."""
        shape = (*like_RLCD.shape[:-1], rows_MD.shape[-1])
        if self.inverse_M is None:
            return _PlaceRows.apply(rows_MD, self.order_M, like_RLCD[..., 0].numel(), workspace).view(shape)
        return _PermuteRows.apply(rows_MD, self.inverse_M, self.order_M).view(shape)


def expert_rows(fill_RL: Tensor, capacity: int) -> ExpertRows:
    """The permutation that compacts the received buffer, from the filled-slot counts.

    Args:
        fill_RL: filled slots per (source rank, local expert) ``[R, E_local]`` (long, on the
            device: what the counts all-to-all delivered).
        capacity: ``C``.

    Returns:
        ``ExpertRows``: the static permutation (no host sync), or on the host path (counts in host
        memory, not tracing) the filled rows alone (the count is read; there is no device to sync).
    """
    num_sources, num_local = fill_RL.shape
    device = fill_RL.device
    ends_L = torch.cumsum(fill_RL.sum(dim=0), 0)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        filled_LRC = torch.arange(capacity, device=device) < fill_RL.t().unsqueeze(-1)
        source_LRC = torch.arange(filled_LRC.numel(), device=device).view(num_sources, num_local, capacity)
        order_T = source_LRC.transpose(0, 1)[filled_LRC]  # (l, r, c) order: expert by expert
        expert_T = torch.repeat_interleave(torch.arange(num_local, device=device), fill_RL.sum(dim=0),
                                           output_size=order_T.numel())
        return ExpertRows(order_T, None, ends_L.to(torch.int32), expert_T)
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
    expert_M = torch.searchsorted(ends_L, torch.arange(order_M.numel(), device=device), right=True)
    return ExpertRows(order_M, inverse_M, ends_L.to(torch.int32), expert_M)
