"""The logical, topology-free view of a model and its optimizer.

Every tensor gets a key that no topology changes: ``model.<fqn>`` for parameters and persistent
buffers, ``optim.<fqn>.<name>`` for optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``,
``step``). A routed-expert tensor is the layer's logical tensor ``[E, ...]`` (``experts.w1 [E, D,
F]``): this rank holds rows ``layer.first_expert : + E_local``, and its optimizer moments are
sharded the same way. Dense tensors are the same on every rank and are saved once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..comm import all_gather_along, gather_experts, lookup, rank
from ..experts import StackedExperts, sharded_expert_parameters
from ..layer import MoELayer


@dataclass(frozen=True)
class ExpertShard:
    """Where one rank's expert tensor sits in the layer's logical tensor: rows
    ``first_expert : first_expert + local`` of ``[num_experts, ...]``, split over ``ep_ranks``; with
    expert tensor parallelism also slice ``tp_ranks.index(rank)`` of ``len(tp_ranks)`` along
    ``tp_dim`` (``d_ff``; ``None``: whole on every TP rank, as ``b2``). ``tp_ranks`` is this rank
    alone without expert TP."""

    num_experts: int
    first_expert: int
    local: int
    ep_ranks: tuple[int, ...]
    tp_ranks: tuple[int, ...]
    tp_dim: Optional[int]

    @property
    def expert_ids(self) -> range:
        """Global ids of this rank's rows."""
        return range(self.first_expert, self.first_expert + self.local)

    def full_shape(self, local_shape: torch.Size) -> tuple[int, ...]:
        """The logical shape for a local ``[local, ...]`` tensor."""
        shape = [self.num_experts, *local_shape[1:]]
        if self.tp_dim is not None:
            shape[self.tp_dim] *= len(self.tp_ranks)
        return tuple(shape)

    def whole_rows(self, local_LX: Tensor) -> Tensor:
        """This rank's rows with their TP slices joined (an all-gather over ``tp_ranks`` with expert
        TP: every rank of the TP group calls it; the tensor itself otherwise)."""
        if self.tp_dim is None or len(self.tp_ranks) == 1:
            return local_LX
        return all_gather_along(local_LX.detach(), self.tp_dim, lookup(self.tp_ranks))

    def gather(self, local_LX: Tensor) -> Tensor:
        """The whole logical tensor: every EP rank's rows, TP slices joined, ``[E_local, ...] ->
        [E, ...]`` (all-gathers; collective: every rank of the groups calls it)."""
        return gather_experts(self.whole_rows(local_LX), lookup(self.ep_ranks))


def expert_shards(model: nn.Module) -> dict[str, ExpertShard]:
    """``{parameter fqn: ExpertShard}`` for every routed-expert parameter of ``model``, found by
    structure (the sharded experts of each ``MoELayer``).

    Raises:
        ValueError: a sharded experts module outside an ``MoELayer`` or not stacked (one module per
            expert): its place in a logical tensor is unknown.
    """
    shards: dict[int, ExpertShard] = {}
    for layer in model.modules():
        if isinstance(layer, MoELayer) and layer.experts.sharded:
            experts = layer.experts
            if not isinstance(experts, StackedExperts):
                raise ValueError(f"{type(experts).__name__} holds one module per expert; topology-free "
                                 "checkpoints need stacked experts (StackedExperts): build the layer with a "
                                 "stacked expert, or use the DeepSpeed engine's own checkpoints")
            split = layer.cfg.expert_tensor_parallel
            for name, param in experts.named_parameters():
                dim = experts.TP_SPLIT.get(name) if split else None
                shards[id(param)] = ExpertShard(layer.cfg.num_experts, layer.first_expert, layer.cfg.num_local_experts,
                                                layer.ep_ranks, layer.tp_ranks if split else (rank(),),
                                                None if dim is None else dim + 1)
    names = {id(param): name for name, param in model.named_parameters()}
    orphans = [names.get(id(param), "?") for param in sharded_expert_parameters(model) if id(param) not in shards]
    if orphans:
        raise ValueError(f"expert parameters {orphans} belong to no MoELayer, so their place among the layer's "
                         "experts is unknown; checkpoint models whose experts live in MoELayer modules")
    return {name: shards[key] for key, name in names.items() if key in shards}


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``{"model.<fqn>": tensor}``: parameters and persistent buffers, detached, sharing storage
    with the model (a load writes into them in place)."""
    tensors = {f"model.{name}": param.detach() for name, param in model.named_parameters()}
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[f"model.{module_name + '.' if module_name else ''}{name}"] = buffer.detach()
    return tensors


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict],
                                                                                   dict[str, dict]]:
    """The optimizer's state under logical keys.

    Returns:
        ``({"optim.<fqn>.<name>": tensor}, param_groups with "params" as fqn lists, {fqn: non-tensor
        state})``. The tensors are the optimizer's own (a load writes into them in place).

    Raises:
        ValueError: the optimizer holds a parameter that is not in ``model``.
    """
    names = {id(param): name for name, param in model.named_parameters()}
    groups, tensors, others = [], {}, {}
    for group in optimizer.param_groups:
        missing = [i for i, param in enumerate(group["params"]) if id(param) not in names]
        if missing:
            raise ValueError(f"the optimizer holds parameters (group positions {missing}) that are not in the model; "
                             "build the optimizer from model.parameters()")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(param)] for param in group["params"]]})
    for param, state in optimizer.state.items():
        name = names[id(param)]
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{key}"] = value
            else:
                others.setdefault(name, {})[key] = value
    return tensors, groups, others


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state if it has none yet (a fresh optimizer), so a
    load has tensors to fill: one step with zero gradients and learning rate 0 (parameters are
    unchanged), gradients cleared after. The same approach as torch's distributed state-dict helpers."""
    if optimizer.state:
        return
    params = [param for group in optimizer.param_groups for param in group["params"] if param.requires_grad]
    if any(param.grad is not None for param in params):
        raise ValueError("load the optimizer before the first backward (its gradients are set); or zero_grad("
                         "set_to_none=True) first")
    lrs = [group.get("lr") for group in optimizer.param_groups]
    for param in params:
        param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        if "lr" in group:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], Tensor) else 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        if lr is not None:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def expert_key_shards(keys: list[str], shards: dict[str, ExpertShard],
                      tensors: dict[str, Tensor]) -> dict[str, ExpertShard]:
    """Which logical keys are expert tensors: ``model.<fqn>`` of an expert parameter, and its
    optimizer state of the same shape (``optim.<fqn>.<name>``; a scalar such as Adam's ``step`` is dense)."""
    found = {}
    for key in keys:
        shard = shards.get(parameter_of(key))
        if shard is not None and tensors[key].dim() > 0 and tensors[key].shape[0] == shard.local:
            found[key] = shard
    return found


def parameter_of(key: str) -> str:
    """The parameter (or buffer) name of a logical key: ``model.<fqn>`` and ``optim.<fqn>.<state>``
    name ``<fqn>``."""
    kind, _, rest = key.partition(".")
    return rest if kind == "model" else rest.rpartition(".")[0]
