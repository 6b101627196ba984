"""The router's learned projections."""

from __future__ import annotations

import math
import struct
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from .registry import ROUTERS


def _fp32(value: float) -> float:
    """``value`` rounded to fp32, as a Python float (exact in fp32); no tensor, so it works under a
    ``torch.device("meta")`` context too."""
    return struct.unpack("f", struct.pack("f", value))[0]


class Router(nn.Module):
    """Linear gate without bias: ``logits_SE = x_SD @ weight.T`` computed in fp32.

    Args:
        d_model: ``D``.
        num_experts: ``E``.
        jitter: in training, multiply the input by ``U(1 - jitter, 1 + jitter)`` noise first
            (Switch Transformer's input jitter; 0 disables it).
        noisy: add ``noise_weight`` for noisy top-k gating (Shazeer et al. 2017).

    Attributes:
        weight: ``[num_experts, d_model]``, replicated on every rank (dense parameter).
        noise_weight: ``[num_experts, d_model]`` or ``None``; the noise scale is
            ``softplus(x @ noise_weight.T)``. Initialised to zero, as in the paper.
    """

    def __init__(self, d_model: int, num_experts: int, jitter: float = 0.0, noisy: bool = False) -> None:
        super().__init__()
        self.jitter = jitter
        # the draw DeepSpeed's multiplicative_jitter makes is low + U(0, 1) * (high - low), with the
        # bounds and their difference rounded to fp32 as its fp32 tensors round them; held as
        # Python floats, so no host tensor is copied to the device in forward
        self._jitter_low = _fp32(1.0 - jitter)
        self._jitter_span = _fp32(_fp32(1.0 + jitter) - self._jitter_low)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        bound = 1.0 / math.sqrt(d_model)
        nn.init.uniform_(self.weight, -bound, bound)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noisy else None

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> Router:
        """The router ``cfg`` asks for (jitter, and a noise projection where the registry says so)."""
        return cls(cfg.d_model, cfg.num_experts, jitter=cfg.jitter_eps, noisy=ROUTERS[cfg.router].noisy)

    def forward(self, x_SD: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``[S, D] -> (logits [S, E], noise std [S, E] or None)``, both fp32, whatever the input
        dtype and under autocast too (softmax and top-k must be stable in bf16 runs). No host sync.

        The noise std ``softplus(x @ noise_weight.T)`` is computed in training only (and only
        with a ``noise_weight``); the jittered input feeds both projections.
        """
        with torch.autocast(x_SD.device.type, enabled=False):
            x_SD = x_SD.float()
            if self.jitter and self.training:
                uniform_SD = torch.rand(x_SD.shape, device=x_SD.device)
                x_SD = x_SD * (uniform_SD * self._jitter_span + self._jitter_low)
            logits_SE = x_SD @ self.weight.float().t()
            if self.noise_weight is None or not self.training:
                return logits_SE, None
            return logits_SE, F.softplus(x_SD @ self.noise_weight.float().t())
