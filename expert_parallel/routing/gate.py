"""The router's learned projection."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Router(nn.Module):
    """Linear gate without bias: ``logits_SE = x_SD @ weight.T`` computed in fp32.

    Attributes:
        weight: ``[num_experts, d_model]``, replicated on every rank (dense parameter).
    """

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        bound = 1.0 / math.sqrt(d_model)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_SD: Tensor) -> Tensor:
        """``[S, D] -> [S, E]`` fp32 logits (fp32 so softmax and top-k are stable in bf16 runs)."""
        return x_SD.float() @ self.weight.float().t()
