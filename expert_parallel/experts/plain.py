"""One expert as a plain ``nn.Module`` (what DeepSpeed's ``MoE(expert=...)`` takes), matching the
stacked experts' math: used to build DeepSpeed-side models and baselines from a config."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import ACTIVATIONS


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, bias-free: ``[..., D] -> [..., D]``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def plain_expert(expert: str, activation: str, d_model: int, d_ff: int, bias: bool = False) -> nn.Module:
    """``SwiGLU`` for ``expert="swiglu"``, else ``Linear -> activation -> Linear``.

    Args:
        expert: ``"ffn"`` or ``"swiglu"`` (``MoEConfig.expert``).
        activation: a key of ``activations.ACTIVATIONS`` (ffn only).
        d_model: ``D``.
        d_ff: ``F``.
        bias: biases on both Linear layers (ffn only; SwiGLU is bias-free).
    """
    if expert == "swiglu":
        return SwiGLU(d_model, d_ff)
    return nn.Sequential(nn.Linear(d_model, d_ff, bias=bias), ACTIVATIONS[activation](),
                         nn.Linear(d_ff, d_model, bias=bias))
