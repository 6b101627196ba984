"""RoutingStats: what the router and the capacity did to one batch (detached tensors)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .layout import DispatchPlan, fill_within
from .routing import Routing


class RoutingStats(NamedTuple):
    """Routing statistics of one forward pass on this rank; every field is a detached tensor.

    Attributes:
        tokens_per_expert: dispatched assignments per global expert ``[E]`` (long), from this
            rank's tokens, before capacity.
        dropped_fraction: dropped / dispatched assignments (scalar).
        dropped_fraction_by_choice: ``[K]``, dropped / dispatched for each choice rank.
        second_dispatched_fraction: fraction of tokens whose 2nd choice was dispatched
            (``k_eff - 1`` for top-2; 0 for top-1).
        k_eff: mean dispatched choices per token (scalar).
        load_cv: coefficient of variation (std / mean) of ``tokens_per_expert``.
        capacity: slots per expert (long scalar).
        nonfinite_tokens: tokens whose router logits hold NaN or inf (long scalar).
        wire_bytes: bytes this rank sends in the dispatch all-to-all of one forward (long
            scalar): the static ``[E, C, D]`` buffer minus the block it keeps for itself, of which
            a TP rank sends its ``C / tp_size`` slots per expert: ``(E - E_local) * (C / tp_size) *
            D * element_size``, padding included; 0 when ``ep_size == 1``.
            Only the dispatch of the forward: the return all-to-all sends as much again, and the
            backward repeats both, so one training step moves ``4 * wire_bytes`` per MoE layer.
            With ``tp_size > 1`` it counts every slot ``C`` of the buffer, which the TP group
            sends together: each TP rank sends its ``C_tp = C / tp_size`` share of them, so one
            rank's own dispatch is ``wire_bytes / tp_size``.
        padding_fraction: empty slots / all slots of the blocks sent (scalar): the share of
            ``wire_bytes`` that is capacity padding, from the plan's fill counts (over the whole
            buffer, or this TP rank's share of it, when ``ep_size == 1`` and nothing is sent).

    For ``soft`` and ``expert_choice`` the K = E columns are the experts, not choice ranks:
    ``k_eff`` is the mean number of experts per token (E for soft, ``E * C / S`` for expert
    choice), ``tokens_per_expert`` is S (soft) or C (expert choice) for every expert, nothing is
    dropped, and ``dropped_fraction_by_choice`` / ``second_dispatched_fraction`` refer to experts
    0 and 1.
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    dropped_fraction_by_choice: Tensor
    second_dispatched_fraction: Tensor
    k_eff: Tensor
    load_cv: Tensor
    capacity: Tensor
    nonfinite_tokens: Tensor
    wire_bytes: Tensor
    padding_fraction: Tensor

    @property
    def dropped_fraction_first(self) -> Tensor:
        """Fraction of first choices dropped by capacity."""
        return self.dropped_fraction_by_choice[0]

    @property
    def dropped_fraction_second(self) -> Tensor:
        """Fraction of dispatched second choices dropped (0 for top-1)."""
        by_choice = self.dropped_fraction_by_choice
        return by_choice[1] if by_choice.numel() > 1 else torch.zeros_like(by_choice[0])


@torch.no_grad()
def routing_stats(routing: Routing, plan: DispatchPlan, nonfinite_tokens: Tensor, ep_size: int,
                  ep_rank: int, row_bytes: int, tp_size: int = 1, tp_rank: int = 0) -> RoutingStats:
    """Compute ``RoutingStats`` without any host sync.

    Args:
        routing: the router's decision for ``S`` tokens.
        plan: the slot plan built from it.
        nonfinite_tokens: count of tokens with non-finite logits (long scalar).
        ep_size: ``R``, ranks of the EP group (the buffer is ``[R, E_local, C, D]`` on the wire).
        ep_rank: this rank's index in the EP group (the block it keeps).
        row_bytes: bytes of one slot of the dispatched buffer, ``D * element_size``.
        tp_size: ranks of the TP group; each sends slots ``[tp_rank * C/tp, (tp_rank + 1) * C/tp)``
            of every expert.
        tp_rank: this rank's index in the TP group.
    """
    active_KS = routing.active_SK.t()
    dispatched_K = active_KS.sum(dim=1).float()
    dropped_K = (active_KS & ~plan.kept_KS).sum(dim=1).float()
    tokens = max(plan.num_tokens, 1)
    count_E = plan.count_E.float()
    mean_load = count_E.mean()
    load_cv = count_E.std(correction=0) / mean_load.clamp_min(1e-9)
    second = dispatched_K[1] / tokens if dispatched_K.numel() > 1 else dispatched_K.new_zeros(())
    wire_bytes, padding = _wire(plan, ep_size, ep_rank, row_bytes, tp_size, tp_rank)
    return RoutingStats(
        tokens_per_expert=plan.count_E,
        dropped_fraction=dropped_K.sum() / dispatched_K.sum().clamp_min(1.0),
        dropped_fraction_by_choice=dropped_K / dispatched_K.clamp_min(1.0),
        second_dispatched_fraction=second,
        k_eff=dispatched_K.sum() / tokens,
        load_cv=load_cv,
        capacity=plan.count_E.new_full((), plan.capacity),  # a fill, not a host-to-device copy
        nonfinite_tokens=nonfinite_tokens,
        wire_bytes=wire_bytes,
        padding_fraction=padding,
    )


def _wire(plan: DispatchPlan, ep_size: int, ep_rank: int, row_bytes: int, tp_size: int,
          tp_rank: int) -> tuple[Tensor, Tensor]:
    """``(wire_bytes, padding_fraction)`` of the dispatch (see ``RoutingStats``); no host sync."""
    share = plan.capacity // tp_size  # the slots of each expert this TP rank sends
    fill_E = plan.fill_E if tp_size == 1 else fill_within(plan.fill_E, tp_rank * share, share)
    fill_RL = fill_E.view(ep_size, -1)
    block_slots = fill_RL.shape[1] * share
    if ep_size == 1:  # nothing is sent: the padding of the whole buffer
        return plan.count_E.new_zeros(()), 1.0 - fill_RL.sum().float() / block_slots
    sent_slots = (ep_size - 1) * block_slots
    filled = fill_RL.sum() - fill_RL[ep_rank].sum()
    return plan.count_E.new_full((), sent_slots * row_bytes), 1.0 - filled.float() / sent_slots
