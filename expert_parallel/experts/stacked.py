"""Experts with stacked weights, run as one batched matmul per weight."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..activations import ACTIVATIONS
from .base import Experts


class StackedExperts(Experts):
    """``num_experts`` independent FFN (or SwiGLU) experts held as stacked tensors.

    Weights: ``w1 [E, D, F]``, ``w2 [E, F, D]``, ``w3 [E, D, F]`` (SwiGLU only), optional
    biases ``b1 [E, F]``, ``b2 [E, D]``. ``sharded`` experts (routed experts, split over the EP
    group) are reduced over the expert-data-parallel group only; unsharded ones (shared experts,
    replicated on every rank) over the whole world (``comm.reduce_gradients``).

    Args:
        num_experts: experts held here (``E_local`` inside a layer).
        d_model: ``D``.
        d_ff: ``F``.
        gated: SwiGLU (``silu(x w1) * (x w3)``) instead of ``act(x w1)``.
        activation: name in ``activations.ACTIVATIONS`` (ignored when ``gated``).
        bias: add ``b1`` and ``b2``.
        sharded: this rank's shard of the EP group's experts (see ``experts.base.Experts``).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, gated: bool = False,
                 activation: str = "gelu", bias: bool = False, sharded: bool = True) -> None:
        super().__init__(sharded)
        self.activation = "silu" if gated else activation
        self.act = ACTIVATIONS[self.activation]()
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if gated else None
        self.b1 = nn.Parameter(torch.empty(num_experts, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, expert by expert: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
        d_model, d_ff = self.w1.shape[1], self.w1.shape[2]
        fan_in = {"w1": d_model, "w3": d_model, "b1": d_model, "w2": d_ff, "b2": d_ff}
        for name, param in self.named_parameters():
            bound = 1.0 / math.sqrt(fan_in[name])
            nn.init.uniform_(param, -bound, bound)

    def forward(self, x_END: Tensor) -> Tensor:
        """Apply expert ``e`` to row block ``e``: ``[E, N, D] -> [E, N, D]`` (batched matmuls)."""
        b1 = None if self.b1 is None else self.b1.unsqueeze(1)
        b2 = None if self.b2 is None else self.b2.unsqueeze(1)
        return self._ffn(x_END, self.w1, self.w3, self.w2, b1, b2)

    def dense(self, x_SD: Tensor) -> Tensor:
        """Every token through every expert, summed: ``[S, D] -> [S, D]``, ``sum_e expert_e(x)``.

        Computed as one wide FFN of hidden width ``E * F`` (the activation is element-wise, so
        ``sum_e act(x w1_e) w2_e = act(x [w1_0 .. w1_E]) [w2_0; ..; w2_E]``): two or three plain
        matmuls, no ``[E, S, D]`` intermediate. This is how shared experts run.
        """
        num_experts, d_model, d_ff = self.w1.shape
        w1_DH = self.w1.transpose(0, 1).reshape(d_model, num_experts * d_ff)
        w3_DH = None if self.w3 is None else self.w3.transpose(0, 1).reshape(d_model, num_experts * d_ff)
        b1 = None if self.b1 is None else self.b1.reshape(-1)
        b2 = None if self.b2 is None else self.b2.sum(dim=0)
        return self._ffn(x_SD, w1_DH, w3_DH, self.w2.reshape(num_experts * d_ff, d_model), b1, b2)

    def _ffn(self, x: Tensor, w1: Tensor, w3: Optional[Tensor], w2: Tensor, b1: Optional[Tensor],
             b2: Optional[Tensor]) -> Tensor:
        """``act(x @ w1 + b1) [* (x @ w3)] @ w2 + b2`` for matching (batched or plain) shapes."""
        hidden = x @ w1
        if b1 is not None:
            hidden = hidden + b1
        hidden = self.act(hidden)
        if w3 is not None:
            hidden = hidden * (x @ w3)
        out = hidden @ w2
        if b2 is not None:
            out = out + b2
        return out
