"""The router's learned projection."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Router(nn.Module):
    """Linear gate without bias: ``logits_SE = x_SD @ weight.T`` computed in fp32.

    Args:
        d_model: ``D``.
        num_experts: ``E``.
        jitter: in training, multiply the input by ``U(1 - jitter, 1 + jitter)`` noise first
            (0 disables it).

    Attributes:
        weight: ``[num_experts, d_model]``, replicated on every rank (dense parameter).
    """

    def __init__(self, d_model: int, num_experts: int, jitter: float = 0.0) -> None:
        super().__init__()
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        bound = 1.0 / math.sqrt(d_model)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_SD: Tensor) -> Tensor:
        """``[S, D] -> [S, E]`` fp32 logits (fp32 so softmax and top-k are stable in bf16 runs)."""
        x_SD = x_SD.float()
        if self.jitter and self.training:
            # the draw DeepSpeed's multiplicative_jitter makes: low + U(0, 1) * (high - low), in fp32
            low, high = torch.tensor(1.0 - self.jitter), torch.tensor(1.0 + self.jitter)
            uniform_SD = torch.rand(x_SD.shape, device=x_SD.device)
            x_SD = x_SD * (low.to(x_SD.device) + uniform_SD * (high - low).to(x_SD.device))
        return x_SD @ self.weight.float().t()
