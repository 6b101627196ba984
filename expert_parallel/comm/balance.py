"""DeepSeek-V3's auxiliary-loss-free balancing, the collective half: one all-reduce of every
router's token counts per optimizer step (the step rule itself is ``routing.selection_bias_step``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .agreement import device_for_backend


def _counting_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that count their routed tokens for a selection-bias update
    (``Router``s with ``bias_update_rate > 0``), in ``model.modules()`` order; found by the buffer
    they hold (``selection_load``), so comm/ needs nothing from routing/."""
    return [module for module in model.modules() if isinstance(getattr(module, "selection_load", None), Tensor)]


@torch.no_grad()
def update_selection_biases(model: nn.Module, group: Optional[ProcessGroup] = None) -> None:
    """Update every selection bias of ``model`` from the loads since the last call; call it after
    each optimizer step, on every rank of ``group``.

    Each router with ``bias_update_rate > 0`` has counted the tokens routed to each of its experts
    in its training forwards (``router.selection_load [E]``). Their counts are concatenated and
    summed over ``group`` with one all-reduce for the whole model (EP and data-parallel ranks
    alike: the global load), then each router adds ``u * sign(mean_load - load_e)`` to its
    ``selection_bias`` and zeroes its counts. Every rank then holds the same biases. One host-side
    collective per call; nothing is read back to the host. A no-op for a model without such routers.

    Args:
        model: the model (or a single layer); every rank must pass the same structure.
        group: the ranks whose loads are summed; ``None`` means the world (or this process alone
            without an initialised process group).
    """
    routers = _counting_modules(model)
    if not routers:
        return
    loads = torch.cat([router.selection_load for router in routers])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        where = device_for_backend(str(dist.get_backend(group)), loads.device)
        reduced = loads.to(where)
        dist.all_reduce(reduced, group=group)
        loads = reduced.to(loads.device)
    for router, load_E in zip(routers, loads.split([router.selection_load.numel() for router in routers])):
        router.apply_selection_load(load_E)
