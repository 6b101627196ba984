"""All-to-all as autograd Functions: blocking (``all_to_all``) or started and waited on later
(``all_to_all_start`` -> ``PendingAllToAll.wait``), flat or hierarchical (``Hierarchy``)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup, Work

from .groups import held
from .hierarchical import Hierarchy, within_nodes

# what the all-to-alls run over: one group (flat), a Hierarchy, or None (a single rank)
A2AGroup = Union[ProcessGroup, Hierarchy, None]


def _issue(x_RX: Tensor, group: A2AGroup) -> tuple[Tensor, Optional[Work]]:
    """Start the all-to-all of ``x_RX [R, ...]``: its output buffer (filled once the returned
    work completes; ``None``: it is complete). A hierarchy runs its intra-node step here, blocking,
    and starts the inter-node one."""
    x_RX = x_RX.contiguous()
    if isinstance(group, Hierarchy):
        x_RX, group = within_nodes(x_RX, group), group.inter
    if group is None:
        return x_RX, None
    out_RX = torch.empty_like(x_RX)
    return out_RX, dist.all_to_all_single(out_RX, x_RX, group=group, async_op=True)


def _held(group: A2AGroup) -> Callable[[], A2AGroup]:
    """``groups.held`` for a flat group or both groups of a ``Hierarchy``."""
    if isinstance(group, Hierarchy):
        intra, inter = held(group.intra), held(group.inter)
        return lambda: Hierarchy(intra(), inter())
    return held(group)


def _finish(out_RX: Tensor, work: Optional[Work]) -> Tensor:
    if work is not None:
        work.wait()
    return out_RX


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all over dim 0; its backward is the same all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: A2AGroup) -> Tensor:  # type: ignore[override]
        ctx.group = _held(group)
        return _finish(*_issue(x, group))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _AllToAll.apply(grad, ctx.group()), None


class _Ticket:
    """The works in flight of one started all-to-all (forward) and of its gradient (backward).

    The autograd graph holds the ticket as long as the output lives, so a work is released as soon
    as it has been waited for: a gloo work kept past ``destroy_process_group`` (an output still
    alive at teardown) can abort the process at exit."""

    def __init__(self, group: A2AGroup) -> None:
        self.group = _held(group)
        self.work: Optional[Work] = None
        self.grad_work: Optional[Work] = None

    def finish(self, out_RX: Tensor, which: str) -> Tensor:
        """``out_RX`` once the work ``which`` (``"work"`` or ``"grad_work"``) has completed; the
        ticket lets go of that work."""
        work = getattr(self, which)
        setattr(self, which, None)
        return _finish(out_RX, work)


class _Start(torch.autograd.Function):
    """Starts the all-to-all; its backward waits for the gradient's all-to-all that ``_Wait``'s
    backward started."""

    @staticmethod
    def forward(ctx, x: Tensor, ticket: _Ticket) -> Tensor:  # type: ignore[override]
        ctx.ticket = ticket
        out, ticket.work = _issue(x, ticket.group())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        ticket, ctx.ticket = ctx.ticket, None
        return ticket.finish(grad, "grad_work"), None


class _Wait(torch.autograd.Function):
    """Waits for the started all-to-all; its backward starts the gradient's all-to-all and returns
    its (still filling) buffer, which ``_Start``'s backward waits for."""

    @staticmethod
    def forward(ctx, out: Tensor, ticket: _Ticket) -> Tensor:  # type: ignore[override]
        ctx.ticket = ticket
        return ticket.finish(out, "work").view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_out, ctx.ticket.grad_work = _issue(grad, ctx.ticket.group())
        return grad_out, None


class PendingAllToAll:
    """A started all-to-all (``all_to_all_start``); ``wait()`` returns its output."""

    def __init__(self, out_RX: Tensor, ticket: Optional[_Ticket] = None) -> None:
        self._out_RX, self._ticket = out_RX, ticket

    def wait(self) -> Tensor:
        """The received ``[R, ...]`` (block ``r`` from rank ``r``), once it has arrived: blocks
        until then. Differentiable; in the backward the gradient's all-to-all is started where this
        call's gradient arrives and waited for where the input's gradient is needed."""
        if self._ticket is None:
            return self._out_RX
        return _Wait.apply(self._out_RX, self._ticket)


def all_to_all(x_RX: Tensor, group: A2AGroup) -> Tensor:
    """Send block ``r`` of dim 0 to rank ``r`` of ``group``; receive block ``r`` from rank ``r``.

    Args:
        x_RX: ``[R, ...]`` with ``R`` the group size (dim 0 split evenly).
        group: the group, or a ``Hierarchy`` of it (the same result in two steps, see
            ``comm.hierarchical``); ``None`` means a single rank (identity).

    Returns:
        ``[R, ...]``, block ``r`` received from rank ``r``. Differentiable. Blocks until received.
    """
    if group is None:
        return x_RX
    return _AllToAll.apply(x_RX, group)


def all_to_all_start(x_RX: Tensor, group: A2AGroup, async_op: bool = True) -> PendingAllToAll:
    """``all_to_all`` started asynchronously (``async_op=True`` of torch.distributed), so compute
    can run until ``.wait()``; same arguments and result. A ``Hierarchy`` runs its intra-node step
    before this returns and overlaps the inter-node one. With ``async_op=False`` it is the blocking
    ``all_to_all``, already complete. Every rank must start and wait in the same order (and so
    must their backwards: the same autograd graph on every rank)."""
    if group is None or not async_op:
        return PendingAllToAll(all_to_all(x_RX, group))
    ticket = _Ticket(group)
    return PendingAllToAll(_Start.apply(x_RX, ticket), ticket)
