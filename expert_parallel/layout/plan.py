"""Slot planning: which buffer slot each (token, choice) takes, by a stable sort.

Slots are assigned choice-major (all first choices in token order, then all second choices in
token order, ...), so capacity drops hit second choices and late tokens first. No one-hot
``[S, E, C]`` tensor and no cumsum over a token-major ``[S, E]`` mask: one stable sort of the
``K*S`` chosen expert ids gives every assignment's rank inside its expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DispatchPlan:
    """Where every (token, choice) goes; produced by ``plan_slots``, consumed by pack/combine.

    Tensors are choice-major ``[K, S]`` (row k holds every token's k-th choice).

    Attributes:
        num_experts: ``E``.
        capacity: ``C``, slots per expert.
        num_tokens: ``S``.
        slot_KS: slot inside the expert's buffer ``[K, S]`` (long; meaningful where active).
        kept_KS: ``[K, S]`` bool, dispatched and within capacity.
        flat_index_KS: row of the flattened ``[E*C]`` buffer ``[K, S]``; ``E*C`` (one past the
            end, a scratch row) where not kept.
        count_E: dispatched assignments per expert before capacity ``[E]`` (long).
    """

    num_experts: int
    capacity: int
    num_tokens: int
    slot_KS: Tensor
    kept_KS: Tensor
    flat_index_KS: Tensor
    count_E: Tensor


def plan_slots(expert_SK: Tensor, active_SK: Tensor, num_experts: int, capacity: int) -> DispatchPlan:
    """Assign buffer slots to the dispatched choices.

    Args:
        expert_SK: chosen expert ids ``[S, K]`` (long).
        active_SK: ``[S, K]`` bool, which choices are dispatched at all (an unsampled GShard
            second choice is not, and takes no slot).
        num_experts: ``E``.
        capacity: ``C``; an assignment whose slot is ``>= C`` is dropped.

    Returns:
        The ``DispatchPlan``.
    """
    num_tokens, top_k = expert_SK.shape
    # inactive choices go to a sentinel bucket E that sorts last and is never packed
    bucket_KS = torch.where(active_SK, expert_SK, num_experts).t()
    bucket_N = bucket_KS.reshape(-1)
    count_with_sentinel = torch.bincount(bucket_N, minlength=num_experts + 1)
    start_E = torch.cumsum(count_with_sentinel, 0) - count_with_sentinel
    sorted_bucket_N, order_N = torch.sort(bucket_N, stable=True)
    rank_sorted_N = torch.arange(bucket_N.numel(), device=bucket_N.device) - start_E[sorted_bucket_N]
    slot_N = torch.empty_like(rank_sorted_N).scatter_(0, order_N, rank_sorted_N)
    slot_KS = slot_N.view(top_k, num_tokens)
    kept_KS = active_SK.t() & (slot_KS < capacity)
    scratch_row = num_experts * capacity
    flat_index_KS = torch.where(kept_KS, bucket_KS * capacity + slot_KS, scratch_row)
    return DispatchPlan(num_experts, capacity, num_tokens, slot_KS, kept_KS, flat_index_KS,
                        count_with_sentinel[:num_experts])
