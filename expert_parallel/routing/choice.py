"""Token-choice routers: logits -> chosen experts, combine weights, dispatch mask.

Each router is a pure function ``(logits_SE, **inputs) -> Routing`` taking only the inputs it
reads (as fairscale's ``top2gating`` takes logits); adding one is a function plus an entry in
``routing.registry.ROUTERS`` and one in ``router_rules.ROUTER_RULES``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .losses import load_balance_loss
from .types import Routing


def _normalized(prob_SX: Tensor) -> Tensor:
    """``prob_SX`` divided by its sum over the last dimension (clamped: underflowing probabilities
    can sum to 0, and 0/0 would be NaN)."""
    return prob_SX / prob_SX.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def switch_top1(logits_SE: Tensor) -> Routing:
    """Switch Transformer top-1: the combine weight is the router probability of the choice (the
    same routing in training and eval; nothing is drawn).

    Args:
        logits_SE: router logits ``[S, E]``.

    Returns:
        ``Routing`` with ``K = 1``.
    """
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    weight_S1, expert_S1 = probs_SE.max(dim=-1, keepdim=True)
    active_S1 = torch.ones_like(expert_S1, dtype=torch.bool)
    aux = load_balance_loss(probs_SE, expert_S1[:, 0])
    return Routing(expert_S1, weight_S1, active_S1, probs_SE, {"load_balance": aux})


def gshard_top2(logits_SE: Tensor, second_policy: str = "random", second_threshold: float = 0.0,
                uniform_S: Optional[Tensor] = None) -> Routing:
    """GShard top-2 with a second-expert policy (GShard Algorithm 1).

    ``g1, g2 = p1 / (p1 + p2), p2 / (p1 + p2)``. Policy ``random`` dispatches the second choice
    iff ``2 * g2 > u``; the uniforms ``u`` are drawn here, before any slot is assigned, so an
    unsampled second choice never takes a slot. Weights are not renormalised after drops.

    Args:
        logits_SE: router logits ``[S, E]``.
        second_policy: ``"random"``, ``"all"`` or ``"threshold"`` (``MoEConfig.second_policy``).
        second_threshold: the ``"threshold"`` policy's bound on ``g2``.
        uniform_S: ``U(0, 1)`` draws ``[S]`` for the ``random`` policy; drawn if ``None``. The
            policy draws in eval mode too (as GShard's reference does): eval output is stochastic
            unless ``second_policy`` is ``"all"`` or ``"threshold"``.

    Returns:
        ``Routing`` with ``K = 2``: column 0 the first choice, column 1 the second.
    """
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    # argmax (first index on ties, documented), not topk (tie order unspecified, device-dependent)
    first_S = probs_SE.argmax(dim=-1)
    runner_up_S = probs_SE.scatter(-1, first_S.unsqueeze(-1), float("-inf")).argmax(dim=-1)
    expert_S2 = torch.stack([first_S, runner_up_S], dim=-1)
    top_p_S2 = probs_SE.gather(-1, expert_S2)
    weight_S2 = _normalized(top_p_S2)
    g2_S = weight_S2[:, 1]
    if second_policy == "random":
        if uniform_S is None:
            uniform_S = torch.rand(g2_S.shape, device=g2_S.device)
        second_S = 2.0 * g2_S > uniform_S
    elif second_policy == "threshold":
        second_S = g2_S > second_threshold
    else:  # "all"
        second_S = torch.ones_like(g2_S, dtype=torch.bool)
    active_S2 = torch.stack([torch.ones_like(second_S), second_S], dim=1)
    aux = load_balance_loss(probs_SE, expert_S2[:, 0])
    return Routing(expert_S2, weight_S2 * active_S2, active_S2, probs_SE, {"load_balance": aux}, balance_choices=1)


def topk(logits_SE: Tensor, top_k: int, scoring_func: str = "softmax", n_group: int = 1, topk_group: int = 1,
         group_score: str = "max", gate_after_topk: bool = False, normalize_topk: bool = False,
         routed_scaling_factor: float = 1.0, selection_bias_E: Optional[Tensor] = None,
         normalize_topk_eps: float = 1e-20) -> Routing:
    """Score-based top-k (Mixtral, Qwen-MoE, DeepSeekMoE/V2/V3, ST-MoE): all k choices are dispatched.

    Scores: ``softmax(logits)`` over all experts, or ``sigmoid(logits)`` per expert with
    ``scoring_func="sigmoid"`` (DeepSeek-V3). Experts are chosen by the selection scores,
    ``scores + selection_bias_E`` (DeepSeek-V3's bias; none by default), restricted with
    ``n_group > 1`` to the ``topk_group`` best groups (``limit_to_groups``); the k largest
    are kept (``torch.topk``, descending selection scores). Combine weights: the kept (unbiased)
    scores; with ``normalize_topk`` divided by their sum (``+ normalize_topk_eps`` for sigmoid:
    DeepSeek-V3's 1e-20, LFM2-MoE's 1e-6); with ``gate_after_topk`` the softmax over the k kept logits (Mixtral;
    mathematically the normalised softmax scores); then times ``routed_scaling_factor``.
    Load-balancing loss ``E * sum_e(f_e * P_e)`` with ``f_e`` the share of all ``S * k`` choices
    that went to ``e`` and ``P`` the softmax, or the sigmoid scores normalised to sum 1 per token.
    No host sync.

    Args:
        logits_SE: router logits ``[S, E]``.
        top_k, scoring_func, n_group, topk_group, group_score, gate_after_topk, normalize_topk,
            routed_scaling_factor, normalize_topk_eps: the ``MoEConfig`` fields of those names
            (deterministic).
        selection_bias_E: ``[E]`` added to the scores for choosing experts and groups only;
            ``None`` adds nothing.

    Returns:
        ``Routing`` with ``K = top_k``, column k the (k+1)-th largest selection score; ``probs_SE``
        the loss's ``P``.
    """
    logits_SE = logits_SE.float()
    if scoring_func == "sigmoid":
        scores_SE = torch.sigmoid(logits_SE)
        probs_SE = _normalized(scores_SE)  # the loss's P: the scores as shares of their sum
    else:
        scores_SE = probs_SE = torch.softmax(logits_SE, dim=-1)
    choice_SE = scores_SE if selection_bias_E is None else scores_SE + selection_bias_E.float()
    if n_group > 1:
        choice_SE = limit_to_groups(choice_SE, n_group, topk_group, group_score)
    expert_SK = choice_SE.topk(top_k, dim=-1).indices
    weight_SK = topk_weights(logits_SE, scores_SE.gather(-1, expert_SK), expert_SK, scoring_func, gate_after_topk,
                             normalize_topk, routed_scaling_factor, normalize_topk_eps)
    active_SK = torch.ones_like(expert_SK, dtype=torch.bool)
    losses = {"load_balance": load_balance_loss(probs_SE, expert_SK)}
    return Routing(expert_SK, weight_SK, active_SK, probs_SE, losses)


def topk_weights(logits_SE: Tensor, score_SK: Tensor, expert_SK: Tensor, scoring_func: str, gate_after_topk: bool,
                 normalize_topk: bool, routed_scaling_factor: float, normalize_topk_eps: float = 1e-20) -> Tensor:
    """``topk``'s combine weights ``[S, K]`` from the chosen experts' (unbiased) scores ``score_SK``
    (see ``topk``; routing replay recomputes them the same way). No host sync."""
    if gate_after_topk:
        weight_SK = torch.softmax(logits_SE.float().gather(-1, expert_SK), dim=-1)
    elif normalize_topk and scoring_func == "sigmoid":
        weight_SK = score_SK / (score_SK.sum(dim=-1, keepdim=True) + normalize_topk_eps)  # DeepSeek-V3's, LFM2's form
    elif normalize_topk:
        weight_SK = _normalized(score_SK)
    else:
        weight_SK = score_SK
    return weight_SK * routed_scaling_factor if routed_scaling_factor != 1.0 else weight_SK


def limit_to_groups(choice_SE: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """DeepSeek-V2/V3's group-limited routing: ``choice_SE`` with every expert outside each
    token's ``topk_group`` best groups set to ``-inf``. ``[S, E] -> [S, E]``, no host sync.

    Group ``g`` holds experts ``[g * E / n_group, (g + 1) * E / n_group)``; its score is the
    largest of its experts' ``choice_SE`` (``"max"``, DeepSeek-V2's ``group_limited_greedy``) or
    the sum of the two largest (``"top2_sum"``, DeepSeek-V3, on the biased scores). DeepSeek-V2
    masks to 0.0 instead of ``-inf``; for its positive softmax scores the top k are the same
    unless a chosen group's scores underflow to 0, where V2's pick among the tied zeros is
    unspecified and this one stays inside the chosen groups.
    """
    num_tokens, num_experts = choice_SE.shape
    grouped_SGX = choice_SE.view(num_tokens, n_group, num_experts // n_group)
    if group_score == "top2_sum":
        group_SG = grouped_SGX.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_SG = grouped_SGX.amax(dim=-1)
    chosen_SJ = group_SG.topk(topk_group, dim=-1).indices
    keep_SG = torch.zeros_like(group_SG, dtype=torch.bool).scatter(-1, chosen_SJ, True)
    keep_SE = keep_SG.unsqueeze(-1).expand_as(grouped_SGX).reshape(num_tokens, num_experts)
    return choice_SE.masked_fill(~keep_SE, float("-inf"))
