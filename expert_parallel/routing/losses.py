"""Auxiliary routing losses (pure tensor math), and the one function that weighs them."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..config import LOSS_WEIGHTS, MoEConfig
from ..counting import count_ids


def load_balance_loss(probs_SE: Tensor, expert_S: Tensor) -> Tensor:
    """GShard / Switch load-balancing loss ``E * sum_e(f_e * P_e)``.

    Args:
        probs_SE: router probabilities ``[S, E]`` (fp32).
        expert_S: the choices that count, before capacity: ``[S]`` (each token's first choice,
            GShard and Switch) or ``[S, K]`` (every choice, ``topk``); ``f_e`` is the share of
            these choices that went to ``e``.

    Returns:
        Scalar tensor, differentiable through ``probs_SE``; 0 when ``S == 0``. It equals 1 for a
        perfectly uniform router.
    """
    num_tokens, num_experts = probs_SE.shape
    fraction_E = count_ids(expert_S, num_experts).to(probs_SE.dtype)
    fraction_E = fraction_E / max(expert_S.numel(), 1)
    mean_prob_E = probs_SE.sum(dim=0) / max(num_tokens, 1)
    return num_experts * torch.dot(fraction_E, mean_prob_E)


def z_loss(logits_SE: Tensor) -> Tensor:
    """ST-MoE's router z-loss ``mean_s(logsumexp_e(logits_se)^2)`` (0 when ``S == 0``).

    Args:
        logits_SE: router logits ``[S, E]``; computed in fp32.
    """
    lse_S = torch.logsumexp(logits_SE.float(), dim=-1)
    return lse_S.square().sum() / max(lse_S.numel(), 1)


def cv_squared(values_E: Tensor) -> Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance; 0 for one value).

    The form of Shazeer et al. 2017 (tensor2tensor's ``cv_squared``, with its ``1e-10`` guard).
    """
    if values_E.numel() <= 1:
        return values_E.new_zeros(())
    mean = values_E.mean()
    return (values_E - mean).square().mean() / (mean.square() + 1e-10)


def weighted_aux_loss(losses: Mapping[str, Tensor], cfg: MoEConfig, like: Tensor) -> Tensor:
    """``sum_name weight(name) * losses[name]``, the weights from ``cfg`` (``config.LOSS_WEIGHTS``).

    Losses with weight 0 are left out (so a NaN in an unused loss cannot leak). ``like`` supplies
    device and dtype of the zero returned when nothing is weighed.
    """
    total = like.new_zeros(())
    for name, loss in losses.items():
        weight = getattr(cfg, LOSS_WEIGHTS[name])
        if weight:
            total = total + weight * loss
    return total
