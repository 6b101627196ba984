"""Routing: logits ``[S, E]`` -> ``Routing`` (pure tensor math, no collectives)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from torch import Tensor

from ..config import MoEConfig
from .choice import gshard_top2, switch_top1, topk
from .deepspeed_gating import deepspeed_gating
from .every_expert import expert_choice, soft
from .gate import Router
from .losses import cv_squared, load_balance_loss, weighted_aux_loss, z_loss
from .noisy import noisy_topk
from .types import Routing

# (logits_SE, cfg, uniform_S, training, noise_std_SE) -> Routing
RouterFn = Callable[[Tensor, MoEConfig, Optional[Tensor], bool, Optional[Tensor]], Routing]
ROUTERS: dict[str, RouterFn] = {"gshard": gshard_top2, "switch": switch_top1, "deepspeed": deepspeed_gating,
                                "topk": topk, "noisy_topk": noisy_topk, "soft": soft,
                                "expert_choice": expert_choice}


def route(logits_SE: Tensor, cfg: MoEConfig, uniform_S: Optional[Tensor] = None,
          training: bool = True, noise_std_SE: Optional[Tensor] = None) -> Routing:
    """Route ``S`` tokens with the router named by ``cfg.router``; add the z-loss if it is weighed.

    Args:
        logits_SE: router logits ``[S, E]``.
        cfg: the layer config.
        uniform_S: optional injected ``U(0, 1)`` noise ``[S]`` for stochastic routers.
        training: the layer's mode (training-only noise and capacity factors depend on it).
        noise_std_SE: ``noisy_topk``'s noise scale ``[S, E]`` (``Router.gate`` gives it).

    Returns:
        The router's ``Routing``; with ``cfg.z_loss_weight > 0`` its ``losses`` hold ``"z"``.
    """
    routing = ROUTERS[cfg.router](logits_SE, cfg, uniform_S, training, noise_std_SE)
    if cfg.z_loss_weight:
        routing = dataclasses.replace(routing, losses={**routing.losses, "z": z_loss(logits_SE)})
    return routing


__all__ = ["ROUTERS", "Router", "Routing", "cv_squared", "deepspeed_gating", "expert_choice", "gshard_top2",
           "load_balance_loss", "noisy_topk", "route", "soft", "switch_top1", "topk", "weighted_aux_loss",
           "z_loss"]
