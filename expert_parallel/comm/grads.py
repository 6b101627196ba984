"""Gradient averaging for data parallelism with expert-parallel parameters."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..experts import sharded_expert_parameters
from .groups import ExpertGroups


def reduce_gradients(module: nn.Module, groups: ExpertGroups) -> None:
    """Average gradients as the gradient of the mean loss over all ranks.

    Dense parameters are summed over the world; expert parameters, those owned by a sharded
    ``experts.Experts`` module (found by structure, so rebuilt or copied parameters are still
    found), only over ``groups.expert_dp_ranks`` (their replicas), because the all-to-all
    backward has already brought every EP rank's contribution to the expert's owner. Both are
    divided by the world size. A no-op without an initialised process group.

    Args:
        module: the model whose ``.grad`` fields are reduced in place.
        groups: this rank's groups, from ``expert_groups(ep_size)``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    expert_dp_group = groups.expert_dp_group
    expert_ids = {id(param) for param in sharded_expert_parameters(module)}
    for param in module.parameters():
        if param.grad is None:
            continue
        if id(param) in expert_ids:
            if expert_dp_group is not None:
                dist.all_reduce(param.grad, group=expert_dp_group)
        else:
            dist.all_reduce(param.grad)
        param.grad.div_(world)
