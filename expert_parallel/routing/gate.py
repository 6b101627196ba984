"""The router's learned projections."""

from __future__ import annotations

import math
import struct
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from .balance import selection_bias_step
from .registry import ROUTERS


def _fp32(value: float) -> float:
    """``value`` rounded to fp32, as a Python float (exact in fp32); no tensor, so it works under a
    ``torch.device("meta")`` context too."""
    return struct.unpack("f", struct.pack("f", value))[0]


class Router(nn.Module):
    """Linear gate ``logits_SE = x_SD @ weight.T (+ bias)`` computed in fp32 (soft-capped to
    ``softcap * tanh(logits / softcap)`` with ``softcap > 0``).

    Args:
        d_model: ``D``.
        num_experts: ``E``.
        jitter: in training, multiply the input by ``U(1 - jitter, 1 + jitter)`` noise first
            (Switch Transformer's input jitter; 0 disables it).
        noisy: add ``noise_weight`` for noisy top-k gating (Shazeer et al. 2017).
        bias: give the linear a trained bias ``bias [E]`` (``MoEConfig.router_bias``).
        selection_bias: hold DeepSeek-V3's ``selection_bias [E]`` buffer (``bias_update_rate > 0``
            implies it).
        bias_update_rate: DeepSeek-V3's update speed ``u`` of the selection bias; > 0 also holds
            the counts ``selection_load`` that ``comm.update_selection_biases`` consumes.
        softcap: ``MoEConfig.router_logit_softcap`` (0 disables it).

    Attributes:
        weight: ``[num_experts, d_model]``, replicated on every rank (dense parameter).
        bias: ``[num_experts]`` trained parameter (initialised to zero), or ``None``.
        noise_weight: ``[num_experts, d_model]`` or ``None``; the noise scale is
            ``softplus(x @ noise_weight.T)``. Initialised to zero, as in the paper.
        selection_bias: ``[num_experts]`` fp32 buffer (zeros; saved in the state dict, not a
            parameter, kept fp32 by ``.to(dtype)``), added to the scores for choosing experts only
            (``routing.topk``); or ``None``.
        selection_load: ``[num_experts]`` long buffer (not saved): tokens routed to each expert by
            the training forwards since the last ``comm.update_selection_biases``; or ``None``.
    """

    def __init__(self, d_model: int, num_experts: int, jitter: float = 0.0, noisy: bool = False, bias: bool = False,
                 selection_bias: bool = False, bias_update_rate: float = 0.0, softcap: float = 0.0) -> None:
        super().__init__()
        self.jitter = jitter
        self.softcap = float(softcap)
        # the draw DeepSpeed's multiplicative_jitter makes is low + U(0, 1) * (high - low), with the
        # bounds and their difference rounded to fp32 as its fp32 tensors round them; held as
        # Python floats, so no host tensor is copied to the device in forward
        self._jitter_low = _fp32(1.0 - jitter)
        self._jitter_span = _fp32(_fp32(1.0 + jitter) - self._jitter_low)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        bound = 1.0 / math.sqrt(d_model)
        nn.init.uniform_(self.weight, -bound, bound)
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_experts)) if bias else None)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noisy else None
        self.bias_update_rate = float(bias_update_rate)
        holds_bias = selection_bias or bias_update_rate > 0
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32) if holds_bias else None)
        self.register_buffer("selection_load", torch.zeros(num_experts, dtype=torch.long) if bias_update_rate > 0
                             else None, persistent=False)

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> Router:
        """The router ``cfg`` asks for (jitter, a linear bias, a noise projection where the registry says
        so, a selection bias and its counts, the logits' soft cap)."""
        return cls(cfg.d_model, cfg.num_experts, jitter=cfg.jitter_eps, noisy=ROUTERS[cfg.router].noisy,
                   bias=cfg.router_bias, selection_bias=cfg.has_selection_bias, bias_update_rate=cfg.bias_update_rate,
                   softcap=cfg.router_logit_softcap)

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
            logits_SE = self.logits(x_SD)
            if self.noise_weight is None or not self.training:
                return logits_SE, None
            return logits_SE, F.softplus(x_SD @ self.noise_weight.float().t())

    def logits(self, x_SD: Tensor) -> Tensor:
        """``[S, D] -> [S, E]``: the fp32 logits of ``x_SD`` as given (no jitter, no noise):
        ``x @ weight.T``, plus ``bias``, soft-capped. What ``forward`` routes by, and what a
        converted Hugging Face block records. No host sync."""
        with torch.autocast(x_SD.device.type, enabled=False):
            logits_SE = x_SD.float() @ self.weight.float().t()
            if self.bias is not None:
                logits_SE = logits_SE + self.bias.float()
            if self.softcap:
                logits_SE = torch.tanh(logits_SE / self.softcap) * self.softcap
            return logits_SE

    def count_selection(self, count_E: Tensor) -> None:
        """Add one training forward's tokens per expert ``[E]`` to ``selection_load`` (in place, no
        host sync); a no-op without a bias update."""
        if self.selection_load is not None:
            self.selection_load.add_(count_E.detach())

    def counts_to_sum(self) -> Optional[Tensor]:
        """``selection_load [E]``, the tokens per expert since the last bias update (``None`` without
        one): what ``comm.update_selection_biases`` sums over the ranks."""
        return self.selection_load

    @torch.no_grad()
    def take_summed_counts(self, load_E: Tensor) -> None:
        """Step ``selection_bias`` by ``routing.selection_bias_step(load_E, bias_update_rate)`` and
        zero ``selection_load``. ``load_E [E]`` is the load summed over every rank;
        ``comm.update_selection_biases`` calls this after its all-reduce. No host sync."""
        self.selection_bias.add_(selection_bias_step(load_E.to(self.selection_bias.device), self.bias_update_rate))
        self.selection_load.zero_()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # .to(bf16) / .half() would round the selection bias, and a bf16 bias of ~0.1 cannot take a
        # step of u = 1e-3: keep the unrounded fp32 values (devices still move)
        bias_E = self.selection_bias
        module = super()._apply(fn, recurse)
        if bias_E is not None and self.selection_bias.dtype != torch.float32:
            self.selection_bias = bias_E.float().to(self.selection_bias.device)
        return module
