"""Auxiliary routing losses (pure tensor math)."""

from __future__ import annotations

import torch
from torch import Tensor


def load_balance_loss(probs_SE: Tensor, first_expert_S: Tensor) -> Tensor:
    """GShard / Switch load-balancing loss ``E^2 * mean_e(f_e * P_e)``.

    Args:
        probs_SE: router probabilities ``[S, E]`` (fp32).
        first_expert_S: each token's first choice ``[S]`` (long), before capacity.

    Returns:
        Scalar tensor, differentiable through ``probs_SE``; 0 when ``S == 0``. It equals 1 for a
        perfectly uniform router.
    """
    num_tokens, num_experts = probs_SE.shape
    denominator = max(num_tokens, 1)
    fraction_E = torch.bincount(first_expert_S, minlength=num_experts).to(probs_SE.dtype)
    fraction_E = fraction_E / denominator
    mean_prob_E = probs_SE.sum(dim=0) / denominator
    return num_experts * torch.dot(fraction_E, mean_prob_E)
