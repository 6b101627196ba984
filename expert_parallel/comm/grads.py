"""Gradient averaging for data parallelism with expert-parallel (and tensor-parallel) parameters."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..experts import sharded_expert_parameters
from .groups import ExpertGroups


def reduce_gradients(module: nn.Module, groups: ExpertGroups) -> None:
    """Average gradients as the gradient of the mean loss over the data-parallel replicas.

    Dense parameters are summed over ``groups.dp_ranks`` (the whole world without tensor
    parallelism; with it, the ranks of one TP rank, so TP-split dense weights of the model stay
    apart); expert parameters, those owned by a sharded ``experts.Experts`` module (found by
    structure, so rebuilt or copied parameters are still found), only over
    ``groups.expert_dp_ranks`` (their replicas), because the all-to-all backward has already
    brought every EP rank's contribution to the expert's owner. Both are divided by the
    data-parallel size (the world size without TP: one loss per replica, which the ranks of a TP
    group hold alike). A no-op without an initialised process group.

    Args:
        module: the model whose ``.grad`` fields are reduced in place.
        groups: this rank's groups, from ``expert_groups(ep_size, tp_size, expert_tensor_parallel)``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    replicas = len(groups.dp_ranks)
    expert_dp_group, dp_group = groups.expert_dp_group, groups.dp_group
    expert_ids = {id(param) for param in sharded_expert_parameters(module)}
    for param in module.parameters():
        if param.grad is None:
            continue
        group = expert_dp_group if id(param) in expert_ids else dp_group
        if group is not None:
            dist.all_reduce(param.grad, group=group)
        param.grad.div_(replicas)
