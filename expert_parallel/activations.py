"""The one activation table: name -> ``nn.Module`` class (or factory), for every expert kind.

``MoEConfig.activation`` is validated against it, stacked experts apply it, plain experts build it
and the DeepSpeed integration recognises a user's activation module by it.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def activation_name(module: nn.Module) -> Optional[str]:
    """The table's name for ``module`` (same class and GELU approximation), or ``None``."""
    for name, make in ACTIVATIONS.items():
        reference = make()
        if type(module) is type(reference) and getattr(module, "approximate", None) == getattr(
                reference, "approximate", None):
            return name
    return None


class ClampedSwiGLU(nn.Module):
    """GPT-OSS's gated activation of a gated expert (``MoEConfig.expert="clamped_swiglu"``):
    ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``,
    element-wise on ``gate = x w1 + b1`` and ``up = x w3 + b3`` (any equal shapes). No host sync.

    Args:
        alpha: the sigmoid's slope (``MoEConfig.swiglu_alpha``; GPT-OSS's ``swiglu_alpha``, 1.702).
        limit: the clamp (``MoEConfig.swiglu_limit``; GPT-OSS's ``swiglu_limit``, 7.0).
    """

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        """``([..., F], [..., F]) -> [..., F]``."""
        gate = gate.clamp(max=self.limit)
        return (up.clamp(-self.limit, self.limit) + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"
