"""Counts summed over ranks once per optimizer step: one all-reduce of every count that a model's
modules keep between steps. comm knows nothing of what is counted or why: a module takes part by
having the two methods of ``RankSummed``. ``routing.Router`` has them (its tokens per expert, for
DeepSeek-V3's selection-bias balancing; the step rule is ``routing.selection_bias_step``)."""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .counts import sum_over_ranks


@runtime_checkable
class RankSummed(Protocol):
    """A module whose counts are summed over ranks by ``update_selection_biases``."""

    def counts_to_sum(self) -> Optional[Tensor]:
        """This rank's counts ``[N]`` since the last sum, or ``None`` when it counts nothing."""

    def take_summed_counts(self, summed: Tensor) -> None:
        """Use the counts ``[N]`` summed over the ranks (and start counting again)."""


@torch.no_grad()
def update_selection_biases(model: nn.Module, group: Optional[ProcessGroup] = None) -> None:
    """Update every selection bias of ``model`` from the loads since the last call; call it after
    each optimizer step, on every rank of ``group``.

    Sums the counts of every ``RankSummed`` module of ``model`` (in ``model.modules()`` order) over
    ``group`` with one all-reduce for the whole model, and hands each module its sum. The modules
    that count are the routers with ``bias_update_rate > 0``: each has counted the tokens routed to
    each of its experts in its training forwards (the global load: EP and data-parallel ranks
    alike), and adds ``u * sign(mean_load - load_e)`` to its ``selection_bias`` and zeroes its
    counts. Every rank then holds the same biases. One host-side collective per call; nothing is
    read back to the host. A no-op for a model without such modules.

    Args:
        model: the model (or a single layer); every rank must pass the same structure.
        group: the ranks whose counts are summed; ``None`` means the world (or this process alone
            without an initialised process group).
    """
    counting = [(module, counts) for module in model.modules() if isinstance(module, RankSummed)
                for counts in [module.counts_to_sum()] if counts is not None]
    if not counting:
        return
    summed = sum_over_ranks(torch.cat([counts for _, counts in counting]), group)
    for (module, _), part in zip(counting, summed.split([counts.numel() for _, counts in counting])):
        module.take_summed_counts(part)
