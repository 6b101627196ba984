"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", Appendix A).

``H(x)_i = (x W_g)_i + N(0, 1) * softplus((x W_noise)_i)`` in training (no noise in eval),
``G(x) = softmax(KeepTopK(H(x), k))`` (the others set to -inf, i.e. weight 0). Two balancing
losses, each with its own weight: the importance loss ``CV(sum_x G(x))^2`` and the load loss
``CV(Load)^2``, ``Load_i = sum_x P(x, i)``, where ``P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x),
k, i)) / softplus((x W_noise)_i))`` is the probability that expert ``i`` stays in the top k when its
own noise is drawn again. Without noise (eval, or ``k == E``) the load is the count of tokens per
expert, as in tensor2tensor's reference implementation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..counting import count_ids
from .losses import cv_squared
from .types import Routing


def _normal_cdf(z: Tensor) -> Tensor:
    """``Phi(z)``, the standard normal CDF, by ``erf``."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def smooth_load(clean_SE: Tensor, noisy_SE: Tensor, noise_std_SE: Tensor, top_SJ: Tensor,
                top_k: int) -> Tensor:
    """The paper's differentiable load ``Load_E = sum_s P(x_s, e)`` ``[E]``.

    ``kth_excluding(H, k, i)`` is the (k+1)-th largest noisy logit when ``i`` is among the top k,
    else the k-th largest; ``top_SJ [S, k+1]`` holds the largest noisy logits, descending.
    """
    threshold_if_in_S1 = top_SJ[:, top_k:top_k + 1]
    threshold_if_out_S1 = top_SJ[:, top_k - 1:top_k]
    is_in_SE = noisy_SE > threshold_if_in_S1
    std_SE = noise_std_SE.clamp_min(1e-9)  # softplus underflow: avoid 0/0
    prob_if_in_SE = _normal_cdf((clean_SE - threshold_if_in_S1) / std_SE)
    prob_if_out_SE = _normal_cdf((clean_SE - threshold_if_out_S1) / std_SE)
    return torch.where(is_in_SE, prob_if_in_SE, prob_if_out_SE).sum(dim=0)


def noisy_topk(logits_SE: Tensor, top_k: int, training: bool = True, noise_std_SE: Optional[Tensor] = None,
               normal_SE: Optional[Tensor] = None) -> Routing:
    """Shazeer et al.'s noisy top-k gating (see the module docstring).

    Args:
        logits_SE: clean logits ``x W_g`` ``[S, E]``.
        top_k: choices per token ``k``.
        training: add the noise and use the smooth load; eval is noise-free.
        noise_std_SE: ``softplus(x W_noise)`` ``[S, E]`` (``Router`` computes it in training);
            ``None`` means no noise.
        normal_SE: the ``N(0, 1)`` draws ``[S, E]``; ``None`` draws them (``torch.randn``).

    Returns:
        ``Routing`` with ``K = top_k`` (column k the (k+1)-th largest noisy logit), every choice
        dispatched, ``probs_SE = softmax(H)``, and the losses ``"importance"`` and ``"load"``.
    """
    clean_SE = logits_SE.float()
    num_experts = clean_SE.shape[1]
    noisy = training and noise_std_SE is not None
    if noisy:
        normal_SE = torch.randn_like(clean_SE) if normal_SE is None else normal_SE.float()
        noisy_SE = clean_SE + normal_SE * noise_std_SE
    else:
        noisy_SE = clean_SE
    top_SJ, expert_SJ = noisy_SE.topk(min(top_k + 1, num_experts), dim=-1)
    expert_SK = expert_SJ[:, :top_k]
    weight_SK = torch.softmax(top_SJ[:, :top_k], dim=-1)
    importance_E = weight_SK.new_zeros(num_experts).index_add(0, expert_SK.reshape(-1), weight_SK.reshape(-1))
    if noisy and top_k < num_experts:
        load_E = smooth_load(clean_SE, noisy_SE, noise_std_SE.float(), top_SJ, top_k)
    else:
        load_E = count_ids(expert_SK, num_experts).to(clean_SE.dtype)
    losses = {"importance": cv_squared(importance_E), "load": cv_squared(load_E)}
    active_SK = torch.ones_like(expert_SK, dtype=torch.bool)
    return Routing(expert_SK, weight_SK, active_SK, torch.softmax(noisy_SE, dim=-1), losses)
