"""MoELayer: route -> plan -> pack -> all-to-all -> experts -> all-to-all -> combine."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .comm import agree_max, dispatch, expert_groups, lookup, register, undispatch
from .config import MoEConfig
from .experts import StackedExperts
from .layout import assign_slots, combine, expert_capacity, kept_weights, pack
from .routing import Router, route, weighted_aux_loss
from .stats import RoutingStats, routing_stats


class MoEOutput(NamedTuple):
    """What ``MoELayer`` returns; unpacks as ``y, aux_loss, stats``.

    Attributes:
        output: ``[..., d_model]``, the input's shape and dtype; dropped tokens give 0.
        aux_loss: scalar, the router's losses weighted by the config (``aux_loss_weight`` times
            the load-balancing loss, ``z_loss_weight`` times the z-loss, ...); differentiable.
        stats: ``RoutingStats`` of this batch (detached).
    """

    output: Tensor
    aux_loss: Tensor
    stats: RoutingStats


def _resolve_ep_ranks(cfg: MoEConfig, ep_group: Optional[ProcessGroup]) -> tuple[int, ...]:
    """Global ranks of the EP group: the one passed in, else built from ``cfg.ep_size``."""
    if ep_group is None:
        return expert_groups(cfg.ep_size).ep_ranks
    if not dist.is_initialized():
        raise RuntimeError(f"ep_group was given with ep_size={cfg.ep_size} but torch.distributed "
                           "is not initialised; call init_process_group first")
    group_size = dist.get_world_size(ep_group)
    if group_size != cfg.ep_size:
        raise ValueError(f"MoEConfig.ep_size={cfg.ep_size} does not match the size {group_size} of "
                         f"ep_group; set ep_size={group_size} or pass a group of {cfg.ep_size} ranks")
    return register(ep_group)


class MoELayer(nn.Module):
    """Mixture-of-Experts layer with experts sharded over an expert-parallel group.

    Global expert ``e`` is local expert ``e % E_local`` on EP rank ``e // E_local``. Call it with
    ``x [..., d_model]``; it returns ``MoEOutput``. The output of dropped tokens is 0, so wrap it
    in a residual connection. Shared experts (``num_shared_experts``) are replicated on every rank
    and see every token; their sum is added to the routed output.

    Attributes:
        router: ``Router`` (``router.weight [E, D]``; ``router.noise_weight`` for noisy top-k).
        experts: this rank's routed experts, ``StackedExperts`` with ``E_local`` experts.
        shared_experts: ``StackedExperts`` ``[num_shared_experts, D, d_ff_shared]`` or ``None``.

    Args:
        cfg: the validated configuration.
        ep_group: the EP process group; ``None`` builds it from ``cfg.ep_size`` (consecutive
            rank blocks, or the local rank alone when ``ep_size == 1``).

    Raises:
        ValueError: ``ep_group`` size differs from ``cfg.ep_size``, or the world size is not a
            multiple of ``ep_size``.
        RuntimeError: ``ep_size > 1`` without an initialised process group.
    """

    def __init__(self, cfg: MoEConfig, ep_group: Optional[ProcessGroup] = None) -> None:
        super().__init__()
        self.cfg = cfg
        # ranks, not the group: the module stays deep-copyable and picklable
        self.ep_ranks = _resolve_ep_ranks(cfg, ep_group)
        self.router = Router.from_config(cfg)
        self.experts = StackedExperts(cfg.num_local_experts, cfg.d_model, cfg.d_ff,
                                      gated=cfg.expert == "swiglu", activation=cfg.activation,
                                      bias=cfg.expert_bias)
        self.shared_experts = StackedExperts(
            cfg.num_shared_experts, cfg.d_model, cfg.shared_d_ff, gated=cfg.expert == "swiglu",
            activation=cfg.activation, bias=cfg.expert_bias, expert_parallel=False,
        ) if cfg.num_shared_experts else None

    def forward(self, x: Tensor) -> MoEOutput:
        """``x [..., d_model] -> MoEOutput`` (see the class docstring)."""
        cfg, group = self.cfg, lookup(self.ep_ranks)
        error = self._input_error(x)
        if error is not None:
            size = self._agreement_size()
            if size and group is not None:  # the peers are about to all-reduce: let them stop too
                agree_max([0] * (size - 1) + [1], group)
            raise ValueError(error)
        x_SD = x.reshape(-1, cfg.d_model)
        logits_SE, noise_std_SE = self.router.gate(x_SD)
        routing = route(logits_SE, cfg, training=self.training, noise_std_SE=noise_std_SE)
        nonfinite = (~torch.isfinite(logits_SE)).any(dim=-1).sum()
        slots = assign_slots(routing.expert_SK, routing.active_SK, cfg.num_experts, routing.priority_SK)
        plan = slots.plan(self._capacity(x_SD.shape[0], slots.count_E, nonfinite, group, routing.capacity))
        buffer_ECD = pack(x_SD, plan)
        expert_in = dispatch(buffer_ECD, cfg.ep_size, group)
        expert_out = self.experts(expert_in)
        buffer_ECD = undispatch(expert_out, cfg.ep_size, group)
        y_SD = combine(buffer_ECD, plan, kept_weights(routing.weight_SK, plan, routing.renormalize_kept))
        if self.shared_experts is not None:
            y_SD = y_SD + self.shared_experts.dense(x_SD)
        stats = routing_stats(routing, plan, nonfinite)
        aux_loss = weighted_aux_loss(routing.losses, cfg, routing.probs_SE)
        return MoEOutput(y_SD.view(x.shape).to(x.dtype), aux_loss, stats)

    def _capacity(self, num_tokens: int, count_E: Tensor, nonfinite: Tensor,
                  group: Optional[ProcessGroup], proposed: Optional[int] = None) -> int:
        """The capacity every EP rank uses; one all-reduce unless ``cfg.capacity`` is fixed.

        ``drop_tokens=False`` agrees on the fullest expert's count instead of the token count; a
        capacity ``proposed`` by the router (``Routing.capacity``) is agreed on as it is.

        With ``check_finite`` the non-finite count rides on the same all-reduce, so every rank
        raises together instead of leaving the others hanging in the all-to-all.
        """
        cfg = self.cfg
        wanted = []
        if cfg.capacity is None and cfg.drop_tokens:
            wanted.append(num_tokens if proposed is None else proposed)
        elif cfg.capacity is None:
            wanted.append(int(count_E.max()) if count_E.numel() else 0)
        if cfg.check_finite:
            wanted.append(int(nonfinite))
        # last entry: set by a rank whose input was invalid (see forward)
        agreed = agree_max(wanted + [0], group) if self._agreement_size() else []
        if agreed and agreed[-1] > 0:
            raise ValueError("another rank of this EP group got invalid MoELayer input (its own error names "
                             "the problem); every rank stops instead of waiting for it in the all-to-all")
        if cfg.check_finite and agreed[-2] > 0:
            raise ValueError(
                f"router logits hold NaN or inf for {agreed[-2]} token(s) on a rank of this EP "
                "group (check_finite=True); check the input and the learning rate, or set "
                "check_finite=False to count them in RoutingStats.nonfinite_tokens instead"
            )
        if cfg.capacity is not None:
            return cfg.capacity
        if not cfg.drop_tokens or proposed is not None:
            return max(agreed[0], 1)
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return expert_capacity(agreed[0], cfg.num_experts, cfg.num_choices, factor, cfg.min_capacity)

    def _agreement_size(self) -> int:
        """Entries of the per-batch all-reduce (capacity input, non-finite count, invalid-input
        flag); 0 when the capacity is fixed and ``check_finite`` is off: then there is none."""
        size = (self.cfg.capacity is None) + self.cfg.check_finite
        return size + 1 if size else 0

    def _input_error(self, x: Tensor) -> Optional[str]:
        """Why the layer cannot route ``x`` (a message naming the fix), or ``None``."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
            return (f"MoELayer input must be a floating-point tensor, got {kind}; pass activations of "
                    "shape [..., d_model]")
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_model:
            return (f"MoELayer input has shape {tuple(x.shape)}, but its last dimension must be "
                    f"d_model={self.cfg.d_model}; reshape the input or fix MoEConfig.d_model")
        weight_dtype = next(self.experts.parameters()).dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            return (f"MoELayer input dtype {x.dtype} differs from the expert weights' {weight_dtype}; "
                    f"cast the layer (layer.to({x.dtype})) or use autocast")
        return None
