"""Auxiliary-loss-free load balancing (DeepSeek-V3, Liu et al. 2024, section 2.1.2): the pure step
rule. The router holds the bias and the counts (``Router.selection_bias``, ``selection_load``);
``comm.update_selection_biases`` sums the counts over the ranks (knowing nothing of routers: the
``Router`` offers them as a ``comm.RankSummed``) and the router applies this rule to the sum."""

from __future__ import annotations

import torch
from torch import Tensor


def selection_bias_step(load_E: Tensor, rate: float) -> Tensor:
    """The change of the selection bias after one step: ``rate * sign(mean(load) - load_e)``.

    An expert that took more than the mean load is pushed down by ``rate``, one that took less is
    pushed up, one at the mean is left alone. No host sync.

    Args:
        load_E: tokens routed to each expert ``[E]`` since the last update, summed over every rank
            (any dtype; the rule runs in fp32).
        rate: the paper's bias update speed ``u`` (``MoEConfig.bias_update_rate``).

    Returns:
        ``[E]`` fp32, to add to ``Router.selection_bias``.
    """
    load_E = load_E.float()
    return rate * torch.sign(load_E.mean() - load_E)
