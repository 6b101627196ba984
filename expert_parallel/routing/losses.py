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


def sequence_balance_loss(probs_SE: Tensor, expert_SX: Tensor, sequence_S: Tensor, num_sequences: int) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the mean over the sequences of
    ``load_balance_loss`` on each sequence's tokens alone. No host sync.

    ``loss = mean_b E * sum_e f_be * P_be``, ``f_be`` the share of sequence ``b``'s counted choices
    that went to ``e``, ``P_be`` its tokens' mean probability of ``e``; the mean is over the
    sequences that hold at least one token (0 when none does).

    Args:
        probs_SE: router probabilities ``[S, E]`` (fp32).
        expert_SX: the choices that count ``[S, X]`` (``X`` leading columns of ``expert_SK``).
        sequence_S: each token's sequence ``[S]`` (long, in ``[0, num_sequences)``).
        num_sequences: ``B``.

    Returns:
        Scalar tensor, differentiable through ``probs_SE``.
    """
    num_experts = probs_SE.shape[1]
    choices_X = expert_SX.shape[1]
    pair_SX = sequence_S.unsqueeze(1) * num_experts + expert_SX
    fraction_BE = count_ids(pair_SX, num_sequences * num_experts).view(num_sequences, num_experts).to(probs_SE.dtype)
    tokens_B = count_ids(sequence_S, num_sequences).to(probs_SE.dtype)
    fraction_BE = fraction_BE / (tokens_B * choices_X).clamp_min(1.0).unsqueeze(1)
    prob_sum_BE = probs_SE.new_zeros(num_sequences, num_experts).index_add(0, sequence_S, probs_SE)
    mean_prob_BE = prob_sum_BE / tokens_B.clamp_min(1.0).unsqueeze(1)
    loss_B = num_experts * (fraction_BE * mean_prob_BE).sum(dim=1)
    return loss_B.sum() / (tokens_B > 0).sum().clamp_min(1)


def global_balance_loss(probs_SE: Tensor, global_count_E: Tensor) -> Tensor:
    """The global-batch balance loss (Qwen, "Demons in the Detail", 2025): ``E * sum_e f_e * P_e``
    with ``f_e = global_count_e / sum(global_count)`` from the counted choices of every
    data-parallel rank (``comm.sum_over_ranks`` gives them) and ``P_e`` the mean probability of
    ``e`` over this rank's tokens. The gradient flows through ``P_e`` only. No host sync.

    Args:
        probs_SE: this rank's router probabilities ``[S, E]`` (fp32).
        global_count_E: counted choices per expert summed over the ranks ``[E]`` (any dtype).

    Returns:
        Scalar tensor; 0 when this rank holds no token.
    """
    count_E = global_count_E.detach().to(probs_SE.dtype)
    fraction_E = count_E / count_E.sum().clamp_min(1.0)
    mean_prob_E = probs_SE.sum(dim=0) / max(probs_SE.shape[0], 1)
    return probs_SE.shape[1] * torch.dot(fraction_E, mean_prob_E)
