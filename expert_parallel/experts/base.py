"""What makes a parameter an expert parameter: the module that owns it, not a tag on it."""

from __future__ import annotations

from torch import nn


class Experts(nn.Module):
    """Base of every module that holds experts (stacked or one module per expert).

    Args:
        sharded: the experts are this rank's shard of its EP group's experts (each EP rank holds
            different ones), so their gradients are reduced over the expert-data-parallel group
            only; ``False`` for experts replicated on every rank (shared experts), which are
            reduced like any dense parameter.

    The flag lives on the module, so it survives what rebuilds parameters (meta init followed by
    ``to_empty``, ``load_state_dict(assign=True)``, ``deepcopy``, ``torch.compile``), unlike an
    attribute set on each parameter.
    """

    def __init__(self, sharded: bool) -> None:
        super().__init__()
        self.sharded = sharded


def sharded_expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` owned by sharded ``Experts`` (each once, in module order)."""
    found: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if isinstance(sub, Experts) and sub.sharded:
            for param in sub.parameters():
                found.setdefault(id(param), param)
    return list(found.values())
