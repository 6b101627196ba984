"""Gradient averaging and clipping for data parallelism with expert-parallel (and tensor-parallel)
parameters."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ..experts import StackedExperts, sharded_expert_parameters
from .agreement import device_for_backend
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


def grad_norm(module: nn.Module, groups: ExpertGroups, norm_type: float = 2.0, foreach: Optional[bool] = None, *,
              tensor_parallel: Iterable[nn.Parameter] = ()) -> Tensor:
    """The norm of the whole logical model's gradient, bitwise the same on every rank.

    Call it after ``reduce_gradients`` (``torch.nn.utils.get_total_norm`` for expert parallelism).
    Every logical parameter counts once: an expert on one replica of its expert-data-parallel group
    (the experts of the EP group summed), its ``d_ff`` slices with expert TP summed over the TP
    group, a dense parameter once (one data-parallel replica, one TP rank), and a TP-split dense
    parameter of the model (``tensor_parallel``) on every TP rank of one replica. Each rank
    computes the ``p``-th power sum of the gradients it counts (the maximum for ``inf``); one
    all-gather of a scalar over the world brings every rank's share, summed in rank order, so every
    rank gets the same bits. Does not sync the host. Collective: every rank must call it.

    Args:
        module: the model, its gradients reduced.
        groups: this rank's groups, the ones given to ``reduce_gradients``.
        norm_type: ``p`` of the p-norm, a number > 0 or ``inf``.
        foreach: torch's ``foreach`` (``None``: the fast kernels where the device has them).
        tensor_parallel: dense parameters the model splits over its TP group (each TP rank holds a
            different slice, e.g. Megatron's column- and row-parallel weights); the others are
            taken to be replicated over the TP group. Expert TP slices are found by structure.

    Returns:
        A float32 scalar on the device of the first gradient (the CPU without any; 0 then).

    Raises:
        ValueError: ``norm_type`` out of range, or a ``tensor_parallel`` parameter that is not a
            dense parameter of ``module``.
    """
    norm_type = float(norm_type)
    if not (norm_type == math.inf or (math.isfinite(norm_type) and norm_type > 0)):
        raise ValueError(f"norm_type={norm_type} must be a number > 0 or inf; use 2.0 (the Euclidean norm) or "
                         "inf (the largest element)")
    grads = [param.grad for param in module.parameters() if param.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    counted = [param.grad for param in _counted_here(module, groups, tensor_parallel) if param.grad is not None]
    share = get_total_norm(counted, norm_type, foreach=foreach).float() if counted else torch.zeros((), device=device)
    if norm_type == math.inf:
        return _world_total(share.to(device), norm_type)
    return _world_total(share.to(device).pow(norm_type), norm_type).pow(1.0 / norm_type)


def clip_grad_norm_(module: nn.Module, max_norm: float, groups: ExpertGroups, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    tensor_parallel: Iterable[nn.Parameter] = ()) -> Tensor:
    """Clip ``module``'s gradients by the norm of the whole logical model's gradient, in place.

    ``torch.nn.utils.clip_grad_norm_`` for expert parallelism; call it after ``reduce_gradients``.
    The norm is ``grad_norm``'s (each expert counted once over EP x expert-data-parallel x expert
    TP, dense parameters once), the same bits on every rank, so every rank scales by the same
    ``min(1, max_norm / (norm + 1e-6))`` (torch's rule) and replicated weights stay identical.
    Syncs the host only for ``error_if_nonfinite`` (as torch does).

    Args:
        module: the model whose ``.grad`` fields are scaled in place.
        max_norm: the bound, a finite number > 0.
        groups: this rank's groups, the ones given to ``reduce_gradients``.
        norm_type: ``p`` of the p-norm, a number > 0 or ``inf``.
        error_if_nonfinite: raise RuntimeError (on every rank) if the norm is NaN or inf; else
            return it, and the gradients are scaled by it as torch does.
        foreach: torch's ``foreach``.
        tensor_parallel: the model's TP-split dense parameters (see ``grad_norm``).

    Returns:
        The total norm (``grad_norm``'s), before clipping.

    Raises:
        ValueError: ``max_norm`` or ``norm_type`` out of range, or a bad ``tensor_parallel``.
        RuntimeError: ``error_if_nonfinite`` and the norm is NaN or inf.
    """
    max_norm = float(max_norm)
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm={max_norm} must be a finite number > 0; pass the bound of the gradient norm "
                         "(or measure it without clipping: expert_parallel.comm.grad_norm)")
    total = grad_norm(module, groups, norm_type, foreach, tensor_parallel=tensor_parallel)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {float(norm_type)} of the gradients is non-finite "
                           f"({total.item()}), so it cannot be clipped; find the NaN/inf gradient, or pass "
                           "error_if_nonfinite=False to scale the gradients by it anyway")
    clip_grads_with_norm_([param for param in module.parameters() if param.grad is not None], max_norm, total,
                          foreach=foreach)
    return total


def _counted_here(module: nn.Module, groups: ExpertGroups, tensor_parallel: Iterable[nn.Parameter]) -> list:
    """The parameters whose gradients this rank counts in the norm (see ``clip_grad_norm_``)."""
    rank = dist.get_rank() if dist.is_initialized() else groups.dp_ranks[0]
    first_tp, first_dp, first_expert_dp = (rank == ranks[0] for ranks in
                                           (groups.tp_ranks, groups.dp_ranks, groups.expert_dp_ranks))
    experts = {id(param) for param in sharded_expert_parameters(module)}
    sliced = {id(param) for sub in module.modules() if isinstance(sub, StackedExperts) and sub.tp_size > 1
              for name, param in sub.named_parameters() if name in sub.TP_SPLIT}
    split = {id(param) for param in tensor_parallel}
    if split - {id(param) for param in module.parameters()} or split & experts:
        raise ValueError("clip_grad_norm_: tensor_parallel holds a parameter that is not a dense parameter of the "
                         "module (an expert's, or another module's); pass only the module's TP-split dense "
                         "parameters (expert TP slices are found by structure)")
    counted = []
    for param in module.parameters():
        if id(param) in experts:
            count = first_expert_dp and (first_tp or id(param) in sliced)
        else:
            count = first_dp and (first_tp or id(param) in split)
        if count:
            counted.append(param)
    return counted


def _world_total(share: Tensor, norm_type: float) -> Tensor:
    """Every rank's ``share`` (a scalar), summed (``inf``: the maximum) in rank order: the same
    bits on every rank. One all-gather over the world; ``share`` itself without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return share
    where = device_for_backend(str(dist.get_backend()), share.device)
    shares = [torch.empty((), dtype=share.dtype, device=where) for _ in range(dist.get_world_size())]
    dist.all_gather(shares, share.to(where))
    stacked = torch.stack(shares).to(share.device)
    return stacked.max() if norm_type == math.inf else stacked.sum()
