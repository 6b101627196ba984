"""Experts with stacked weights, run as one batched matmul per weight."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATION_FNS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class StackedExperts(nn.Module):
    """``num_experts`` independent FFN (or SwiGLU) experts held as stacked tensors.

    Weights: ``w1 [E, D, F]``, ``w2 [E, F, D]``, ``w3 [E, D, F]`` (SwiGLU only), optional
    biases ``b1 [E, F]``, ``b2 [E, D]``. Every parameter is marked ``expert_parallel = True`` so a
    data-parallel wrapper reduces it over the expert-data-parallel group only.

    Args:
        num_experts: experts held here (``E_local`` inside a layer).
        d_model: ``D``.
        d_ff: ``F``.
        gated: SwiGLU (``silu(x w1) * (x w3)``) instead of ``act(x w1)``.
        activation: name in ``ACTIVATION_FNS`` (ignored when ``gated``).
        bias: add ``b1`` and ``b2``.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, gated: bool = False,
                 activation: str = "gelu", bias: bool = False) -> None:
        super().__init__()
        self.activation = "silu" if gated else activation
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if gated else None
        self.b1 = nn.Parameter(torch.empty(num_experts, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()
        for param in self.parameters():
            param.expert_parallel = True

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, expert by expert: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
        d_model, d_ff = self.w1.shape[1], self.w1.shape[2]
        fan_in = {"w1": d_model, "w3": d_model, "b1": d_model, "w2": d_ff, "b2": d_ff}
        for name, param in self.named_parameters():
            bound = 1.0 / math.sqrt(fan_in[name])
            nn.init.uniform_(param, -bound, bound)

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy rebuilds every Parameter without its attributes: mark them again
        super().__setstate__(state)
        for param in self.parameters():
            param.expert_parallel = True

    def forward(self, x_END: Tensor) -> Tensor:
        """Apply expert ``e`` to row block ``e``: ``[E, N, D] -> [E, N, D]``."""
        hidden_ENF = torch.bmm(x_END, self.w1)
        if self.b1 is not None:
            hidden_ENF = hidden_ENF + self.b1.unsqueeze(1)
        hidden_ENF = ACTIVATION_FNS[self.activation](hidden_ENF)
        if self.w3 is not None:
            hidden_ENF = hidden_ENF * torch.bmm(x_END, self.w3)
        out_END = torch.bmm(hidden_ENF, self.w2)
        if self.b2 is not None:
            out_END = out_END + self.b2.unsqueeze(1)
        return out_END
