"""Token-choice routers: logits -> chosen experts, combine weights, dispatch mask.

Each router is a pure function ``(logits_SE, cfg, **inputs) -> Routing`` taking only the inputs it
reads; adding one is a function plus an entry in ``routing.registry.ROUTERS``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import MoEConfig
from .losses import load_balance_loss
from .types import Routing


def _normalized(prob_SK: Tensor) -> Tensor:
    """``prob_SK`` divided by its sum over the choices (clamped: underflowing probabilities can
    sum to 0, and 0/0 would be NaN)."""
    return prob_SK / prob_SK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def switch_top1(logits_SE: Tensor, cfg: MoEConfig) -> Routing:
    """Switch Transformer top-1: the combine weight is the router probability of the choice.

    Args:
        logits_SE: router logits ``[S, E]``.
        cfg: the layer config (the same routing in training and eval; nothing is drawn).

    Returns:
        ``Routing`` with ``K = 1``.
    """
    probs_SE = torch.softmax(logits_SE.float(), dim=-1)
    weight_S1, expert_S1 = probs_SE.max(dim=-1, keepdim=True)
    active_S1 = torch.ones_like(expert_S1, dtype=torch.bool)
    aux = load_balance_loss(probs_SE, expert_S1[:, 0])
    return Routing(expert_S1, weight_S1, active_S1, probs_SE, {"load_balance": aux})


def gshard_top2(logits_SE: Tensor, cfg: MoEConfig, uniform_S: Optional[Tensor] = None) -> Routing:
    """GShard top-2 with the second-expert policy of ``cfg`` (GShard Algorithm 1).

    ``g1, g2 = p1 / (p1 + p2), p2 / (p1 + p2)``. Policy ``random`` dispatches the second choice
    iff ``2 * g2 > u``; the uniforms ``u`` are drawn here, before any slot is assigned, so an
    unsampled second choice never takes a slot. Weights are not renormalised after drops.

    Args:
        logits_SE: router logits ``[S, E]``.
        cfg: supplies ``second_policy`` and ``second_threshold``.
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
    if cfg.second_policy == "random":
        if uniform_S is None:
            uniform_S = torch.rand(g2_S.shape, device=g2_S.device)
        second_S = 2.0 * g2_S > uniform_S
    elif cfg.second_policy == "threshold":
        second_S = g2_S > cfg.second_threshold
    else:  # "all"
        second_S = torch.ones_like(g2_S, dtype=torch.bool)
    active_S2 = torch.stack([torch.ones_like(second_S), second_S], dim=1)
    aux = load_balance_loss(probs_SE, expert_S2[:, 0])
    return Routing(expert_S2, weight_S2 * active_S2, active_S2, probs_SE, {"load_balance": aux})


def topk(logits_SE: Tensor, cfg: MoEConfig) -> Routing:
    """Softmax top-k (Mixtral, DeepSeekMoE, ST-MoE): every one of the k choices is dispatched.

    ``probs = softmax(logits)`` over all experts; the k largest are kept (``torch.topk``, in
    descending order). Combine weights: the kept probabilities; with ``cfg.normalize_topk``
    divided by their sum; with ``cfg.gate_after_topk`` the softmax over the k kept logits
    (Mixtral; mathematically equal to the normalised probabilities). Load-balancing loss
    ``E * sum_e(f_e * P_e)`` with ``f_e`` the share of all ``S * k`` choices that went to ``e``.

    Args:
        logits_SE: router logits ``[S, E]``.
        cfg: supplies ``top_k``, ``normalize_topk``, ``gate_after_topk`` (deterministic).

    Returns:
        ``Routing`` with ``K = top_k``, column k the (k+1)-th largest probability.
    """
    logits_SE = logits_SE.float()
    probs_SE = torch.softmax(logits_SE, dim=-1)
    prob_SK, expert_SK = probs_SE.topk(cfg.top_k, dim=-1)
    if cfg.gate_after_topk:
        weight_SK = torch.softmax(logits_SE.gather(-1, expert_SK), dim=-1)
    elif cfg.normalize_topk:
        weight_SK = _normalized(prob_SK)
    else:
        weight_SK = prob_SK
    active_SK = torch.ones_like(expert_SK, dtype=torch.bool)
    losses = {"load_balance": load_balance_loss(probs_SE, expert_SK)}
    return Routing(expert_SK, weight_SK, active_SK, probs_SE, losses)
