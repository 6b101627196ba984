"""DeepSpeed's gating as pure routers: ``top1gating``, ``top2gating`` and ``topkgating`` of
``deepspeed/moe/sharded_moe.py``, reproduced step for step so that a model trained with
DeepSpeed's MoE computes the same function with ours.

What they share, and where they differ from GShard (``choice.gshard_top2``):
- Capacity ``C = max(ceil(S / E * capacity_factor * k), min_capacity)`` from this rank's token
  count, in fp32 as DeepSpeed computes it (returned as ``Routing.capacity``).
- Top-1 keeps, per overflowing expert, the tokens ``torch.topk`` picks from the one-hot mask
  (times ``U(0, 1)`` noise with random token selection); top-k keeps the highest gate values.
  We call the same ``topk`` on the same tensors, so ties resolve as DeepSpeed's do; the kept
  tokens are given the first slots (``Routing.priority_SK``).
- Top-2 picks its second expert by ``argmax`` of the logits without the first (Gumbel noise added
  with ``second_policy="gumbel"``); top-2 and top-k renormalise the gates over the choices that
  survive capacity (``Routing.renormalize_kept``).
- Random draws (Gumbel, RTS uniforms) are taken with the same calls and in the same order as
  DeepSpeed, so equal RNG states give equal samples.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import Routing


def deepspeed_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                       min_capacity: int) -> int:
    """DeepSpeed's ``_capacity``: ``max(ceil(S / E * (capacity_factor * k)), min_capacity)``.

    The product is taken in fp32 as DeepSpeed takes it (``ceil`` of an fp32 value can differ from
    exact arithmetic by one, e.g. ``S=196, E=3, cf=1.25, k=3`` gives 246, not 245).
    """
    even_split = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * top_k))
    return max(int(even_split), min_capacity)


def _gumbel(shape: torch.Size, device: torch.device) -> Tensor:
    """Standard Gumbel noise, drawn as DeepSpeed's ``gumbel_rsample`` draws it."""
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape)


def _me_ce(gates_SE: Tensor, mask_SE: Tensor) -> Tensor:
    """``me * ce`` ``[E]``: DeepSpeed's mean gate times mean mask (its aux-loss terms); zeros
    (still in the graph) for no tokens, where DeepSpeed's means would be NaN."""
    if gates_SE.shape[0] == 0:
        return gates_SE.sum(dim=0) * 0.0
    return torch.mean(gates_SE, dim=0) * torch.mean(mask_SE.float(), dim=0)


def _kept_first(kept_SK: Tensor) -> Tensor:
    """Slot priority ``[S, K]`` that gives the kept assignments the first slots of an expert."""
    return (~kept_SK).to(torch.int8)


def deepspeed_top1(logits_SE: Tensor, capacity: Optional[int], gumbel: bool = False,
                   random_token_selection: bool = False) -> Routing:
    """DeepSpeed's ``top1gating`` (``used_token=None``).

    First choice ``argmax(softmax(logits))`` (``argmax(logits + Gumbel)`` with ``gumbel``); weight =
    its probability (no renormalisation). Aux loss ``E * sum_e(me * ce)``. ``random_token_selection``
    keeps a random subset of an overflowing expert's tokens (DeepSpeed's ``use_rts``).

    Returns:
        ``Routing`` with ``K = 1``; with a ``capacity`` (``None``: no drops) it fixes it and a
        priority that keeps exactly the tokens DeepSpeed keeps.
    """
    gates_SE = F.softmax(logits_SE, dim=1)
    num_tokens, num_experts = gates_SE.shape
    if gumbel:
        expert_S = torch.argmax(logits_SE + _gumbel(logits_SE.shape, logits_SE.device), dim=1)
    else:
        expert_S = torch.argmax(gates_SE, dim=1)
    mask_SE = F.one_hot(expert_S, num_classes=num_experts)
    aux_loss = torch.sum(_me_ce(gates_SE, mask_SE)) * num_experts
    score_SE = mask_SE
    if random_token_selection:  # drawn with or without drops, as DeepSpeed draws it
        score_SE = mask_SE * torch.rand(mask_SE.shape, device=mask_SE.device)
    priority_S1 = None
    if capacity is not None:
        chosen_CE = torch.topk(score_SE, k=min(capacity, num_tokens), dim=0)[1]
        selected_SE = torch.zeros_like(mask_SE).scatter_(0, chosen_CE, 1)
        kept_S1 = (mask_SE * selected_SE).sum(dim=1, keepdim=True) > 0
        priority_S1 = _kept_first(kept_S1)
    expert_S1 = expert_S.unsqueeze(1)
    return Routing(expert_S1, gates_SE.gather(1, expert_S1), torch.ones_like(expert_S1, dtype=torch.bool),
                   gates_SE, {"load_balance": aux_loss}, priority_S1, renormalize_kept=False, capacity=capacity)


def deepspeed_top2(logits_SE: Tensor, capacity: Optional[int], gumbel: bool = False) -> Routing:
    """DeepSpeed's ``top2gating``.

    First choice ``argmax(probs)``; second ``argmax`` of the logits (plus Gumbel noise with
    ``gumbel``, ``second_policy="gumbel"``, in training and eval alike, as DeepSpeed) without the first; both
    always dispatched, first choices before second choices; weights renormalised over the kept
    choices. Aux loss ``E * sum_e(me * ce)`` over first choices.
    """
    gates_SE = F.softmax(logits_SE, dim=1)
    num_tokens, num_experts = gates_SE.shape
    first_S = torch.argmax(gates_SE, dim=1)
    mask1_SE = F.one_hot(first_S, num_classes=num_experts)
    if gumbel:
        logits_SE = logits_SE + _gumbel(logits_SE.shape, logits_SE.device)
    second_S = torch.argmax(logits_SE.masked_fill(mask1_SE.bool(), float("-inf")), dim=1)
    aux_loss = torch.mean(_me_ce(gates_SE, mask1_SE)) * num_experts * num_experts
    expert_S2 = torch.stack([first_S, second_S], dim=1)
    return Routing(expert_S2, gates_SE.gather(1, expert_S2), torch.ones_like(expert_S2, dtype=torch.bool),
                   gates_SE, {"load_balance": aux_loss}, None, renormalize_kept=True, capacity=capacity,
                   balance_choices=1)


def deepspeed_topk(logits_SE: Tensor, top_k: int, capacity: Optional[int]) -> Routing:
    """DeepSpeed's ``topkgating`` (``drop_policy="probs"``), for any ``k``.

    Choices ``topk(probs, k)``, all dispatched; an overflowing expert keeps its tokens with the
    highest gate values; weights renormalised over the kept choices. Aux loss
    ``E / k * sum_e(me * ce)`` with ``ce`` counting every choice.
    """
    gates_SE = F.softmax(logits_SE, dim=1)
    num_tokens, num_experts = gates_SE.shape
    gate_SK, expert_SK = torch.topk(gates_SE, k=top_k, dim=1)
    mask_SE = torch.zeros_like(gates_SE, dtype=torch.bool).scatter_(1, expert_SK, True)
    aux_loss = torch.mean(_me_ce(gates_SE, mask_SE)) * num_experts * num_experts / top_k
    priority_SK = None
    if capacity is not None:
        masked_gates_SE = torch.zeros_like(gates_SE).scatter(1, expert_SK, gate_SK)
        chosen_CE = torch.topk(masked_gates_SE, k=min(capacity, num_tokens), dim=0, sorted=False)[1]
        selected_SE = torch.zeros_like(gates_SE, dtype=torch.bool).scatter_(0, chosen_CE, True)
        priority_SK = _kept_first(selected_SE.gather(1, expert_SK))
    return Routing(expert_SK, gate_SK, torch.ones_like(expert_SK, dtype=torch.bool), gates_SE,
                   {"load_balance": aux_loss}, priority_SK, renormalize_kept=True, capacity=capacity)


def deepspeed_gating(logits_SE: Tensor, top_k: int, capacity_factor: float, min_capacity: int,
                     drop_tokens: bool = True, second_policy: str = "all", router_gumbel: bool = False,
                     random_token_selection: bool = False, training: bool = True) -> Routing:
    """DeepSpeed's ``TopKGate``: top-1 for ``k = 1``, top-2 for ``k = 2``, top-k otherwise.

    Args:
        logits_SE: router logits ``[S, E]`` (fp32).
        top_k: choices per token ``k``.
        capacity_factor: the mode's factor (DeepSpeed's ``capacity_factor`` in training,
            ``eval_capacity_factor`` in eval).
        min_capacity: DeepSpeed's ``min_capacity``.
        drop_tokens: derive a capacity (``deepspeed_capacity``) and drop past it; else none.
        second_policy: top-2 only: ``"gumbel"`` samples the second expert (``top2_2nd_expert_sampling``).
        router_gumbel: top-1 only: Gumbel-sampled first choice in training (``noisy_gate_policy="RSample"``).
        random_token_selection: top-1 only: DeepSpeed's ``use_rts``.
        training: ``router_gumbel`` noise applies in training only. The draws are DeepSpeed's own
            (Gumbel, ``[S, E]`` uniforms), so that seeded runs of both libraries sample alike.

    Returns:
        ``Routing`` with ``K = top_k``.
    """
    num_tokens, num_experts = logits_SE.shape
    capacity = deepspeed_capacity(num_tokens, num_experts, top_k, capacity_factor, min_capacity) if (
        drop_tokens) else None
    if top_k == 1:
        return deepspeed_top1(logits_SE.float(), capacity, router_gumbel and training, random_token_selection)
    if top_k == 2:
        return deepspeed_top2(logits_SE.float(), capacity, second_policy == "gumbel")
    return deepspeed_topk(logits_SE.float(), top_k, capacity)
