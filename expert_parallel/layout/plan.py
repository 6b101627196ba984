"""Slot planning: which buffer slot each (token, choice) takes, by a stable sort.

Slots are assigned choice-major (all first choices in token order, then all second choices in
token order, ...), so capacity drops hit second choices and late tokens first. No one-hot
``[S, E, C]`` tensor and no cumsum over a token-major ``[S, E]`` mask: one stable sort of the
``K*S`` chosen expert ids gives every assignment's rank inside its expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..counting import count_ids


@dataclass(frozen=True)
class DispatchPlan:
    """Where every (token, choice) goes; produced by ``SlotAssignment.plan``, consumed by pack and
    combine.

    Tensors are choice-major ``[K, S]`` (row k holds every token's k-th choice).

    Attributes:
        num_experts: ``E``.
        capacity: ``C``, slots per expert.
        num_tokens: ``S``.
        kept_KS: ``[K, S]`` bool, dispatched and within capacity.
        flat_index_KS: row of the flattened ``[E*C]`` buffer ``[K, S]``; ``E*C`` (one past the
            end, a scratch row) where not kept.
        count_E: dispatched assignments per expert before capacity ``[E]`` (long).
        token_N: the token in each of the ``E*C`` slots (long); ``S`` marks an empty slot. Pack
            gathers by it and combine adds back by it.
    """

    num_experts: int
    capacity: int
    num_tokens: int
    kept_KS: Tensor
    flat_index_KS: Tensor
    count_E: Tensor
    token_N: Tensor

    @property
    def fill_E(self) -> Tensor:
        """Filled slots per expert ``[E]``: slots are assigned densely from 0, so the kept
        assignments of expert ``e`` are its first ``min(count_E[e], C)`` slots. No host sync."""
        return self.count_E.clamp_max(self.capacity)


@dataclass(frozen=True)
class SlotAssignment:
    """Capacity-independent half of planning: each assignment's rank inside its expert.

    Attributes:
        expert_KS: ``[K, S]`` expert id, or ``E`` (a sentinel) where the choice is inactive.
        slot_KS: ``[K, S]`` rank inside the expert, in priority order.
        count_E: dispatched assignments per expert ``[E]`` (long, on the device).
    """

    expert_KS: Tensor
    slot_KS: Tensor
    count_E: Tensor

    def plan(self, capacity: int) -> DispatchPlan:
        """Cut every expert at ``capacity`` slots: ``slot >= capacity`` is dropped. No host sync."""
        num_experts = self.count_E.numel()
        kept_KS = (self.expert_KS < num_experts) & (self.slot_KS < capacity)
        num_slots, num_tokens = num_experts * capacity, self.expert_KS.shape[1]
        flat_index_KS = torch.where(kept_KS, self.expert_KS * capacity + self.slot_KS, num_slots)
        # not-kept entries all land on a scratch row past the end, which is cut off
        token_KS = torch.arange(num_tokens, device=flat_index_KS.device).expand_as(flat_index_KS)
        token_N = flat_index_KS.new_full((num_slots + 1,), num_tokens)
        token_N = token_N.scatter_(0, flat_index_KS.reshape(-1), token_KS.reshape(-1))[:num_slots]
        return DispatchPlan(num_experts, capacity, num_tokens, kept_KS, flat_index_KS, self.count_E, token_N)


def assign_slots(expert_SK: Tensor, active_SK: Tensor, num_experts: int,
                 priority_SK: Optional[Tensor] = None) -> SlotAssignment:
    """Rank every dispatched choice inside its expert.

    Args:
        expert_SK: chosen expert ids ``[S, K]`` (long).
        active_SK: ``[S, K]`` bool, which choices are dispatched at all (an unsampled GShard
            second choice is not, and takes no slot).
        num_experts: ``E``.
        priority_SK: optional ``[S, K]`` sort key: within an expert, smaller keys take earlier
            slots (e.g. random token selection). Default: choice-major, then token order.

    Returns:
        The ``SlotAssignment``; call ``.plan(capacity)`` for the ``DispatchPlan``.
    """
    num_tokens, top_k = expert_SK.shape
    # inactive choices go to a sentinel bucket E that sorts last and is never packed
    bucket_KS = torch.where(active_SK, expert_SK, num_experts).t()
    bucket_A = bucket_KS.reshape(-1)
    order_A = torch.arange(bucket_A.numel(), device=bucket_A.device)
    if priority_SK is not None:
        order_A = torch.sort(priority_SK.t().reshape(-1), stable=True).indices
    count_with_sentinel = count_ids(bucket_A, num_experts + 1)
    start_E = torch.cumsum(count_with_sentinel, 0) - count_with_sentinel
    sorted_bucket_A, by_bucket_A = torch.sort(bucket_A[order_A], stable=True)
    order_A = order_A[by_bucket_A]
    rank_sorted_A = torch.arange(bucket_A.numel(), device=bucket_A.device) - start_E[sorted_bucket_A]
    slot_A = torch.empty_like(rank_sorted_A).scatter_(0, order_A, rank_sorted_A)
    return SlotAssignment(bucket_KS, slot_A.view(top_k, num_tokens), count_with_sentinel[:num_experts])

