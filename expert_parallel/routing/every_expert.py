"""Routers whose K columns are the E experts: soft mixture and expert choice.

Column ``e`` of ``expert_SK`` is expert ``e`` for every token, so the shared plan / pack /
dispatch / combine path serves them unchanged: each expert's slots are filled by its column alone,
in token order. ``active_SK`` says which (token, expert) pairs are dispatched.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..layout.capacity import expert_capacity
from .types import Routing


def _every_expert_SE(num_tokens: int, num_experts: int, device: torch.device) -> Tensor:
    """``[S, E]`` long, row after row ``0 .. E-1`` (an expanded view, no copy)."""
    return torch.arange(num_experts, device=device).expand(num_tokens, num_experts)


def soft(logits_SE: Tensor) -> Routing:
    """Dense soft mixture (Jacobs et al. 1991): ``y = sum_e p_e * expert_e(x)``, ``p = softmax``.

    Every token goes to every expert, so the capacity is the local token count (the layer agrees
    on the maximum over the EP group): nothing is ever dropped, and every token visits every rank.

    Args:
        logits_SE: router logits ``[S, E]`` (deterministic; nothing else changes soft routing).

    Returns:
        ``Routing`` with ``K = E``, weights ``probs_SE``, all active, ``capacity = S``; no losses.
    """
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    num_tokens, num_experts = probs_SE.shape
    expert_SE = _every_expert_SE(num_tokens, num_experts, probs_SE.device)
    active_SE = torch.ones_like(probs_SE, dtype=torch.bool)
    return Routing(expert_SE, probs_SE, active_SE, probs_SE, {}, capacity=num_tokens)


def expert_choice(logits_SE: Tensor, capacity_factor: float, min_capacity: int,
                  capacity: Optional[int] = None) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens of this rank.

    ``probs = softmax(logits)`` over experts (token by token); expert ``e`` takes the ``C`` tokens
    with the largest ``probs[:, e]`` (``torch.topk`` over tokens) and weighs each by that
    probability. ``C = min(S, max(min_capacity, ceil(S * capacity_factor / E)))`` from the local
    token count ``S`` (``min(S, capacity)`` when the config fixes it). Every expert processes
    exactly ``C`` tokens, so no balancing loss is needed and nothing picked is dropped; a token may
    be picked by several experts or by none (the residual carries it).

    Args:
        logits_SE: router logits ``[S, E]``.
        capacity_factor: the mode's factor (``MoEConfig.capacity_factor_for``).
        min_capacity: the lower bound of the derived capacity.
        capacity: a fixed capacity (``MoEConfig.capacity``), or ``None`` to derive it.

    Returns:
        ``Routing`` with ``K = E``, ``active_SK`` the picked pairs, ``capacity = C``; no losses.
    """
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    num_tokens, num_experts = probs_SE.shape
    if capacity is None:
        capacity = expert_capacity(num_tokens, num_experts, 1, capacity_factor, min_capacity)
    capacity = min(capacity, num_tokens)
    picked_CE = probs_SE.topk(capacity, dim=0).indices
    active_SE = torch.zeros_like(probs_SE, dtype=torch.bool).scatter_(0, picked_CE, True)
    expert_SE = _every_expert_SE(num_tokens, num_experts, probs_SE.device)
    return Routing(expert_SE, probs_SE * active_SE, active_SE, probs_SE, {}, capacity=capacity)
