"""Routing: logits ``[S, E]`` -> ``Routing`` (pure tensor math, no collectives)."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from ..config import MoEConfig
from .choice import gshard_top2, switch_top1
from .deepspeed_gating import deepspeed_gating
from .gate import Router
from .losses import load_balance_loss
from .types import Routing

RouterFn = Callable[[Tensor, MoEConfig, Optional[Tensor], bool], Routing]
ROUTERS: dict[str, RouterFn] = {"gshard": gshard_top2, "switch": switch_top1,
                                "deepspeed": deepspeed_gating}


def route(logits_SE: Tensor, cfg: MoEConfig, uniform_S: Optional[Tensor] = None,
          training: bool = True) -> Routing:
    """Route ``S`` tokens with the router named by ``cfg.router``.

    Args:
        logits_SE: router logits ``[S, E]``.
        cfg: the layer config.
        uniform_S: optional injected ``U(0, 1)`` noise ``[S]`` for stochastic routers.
        training: the layer's mode (training-only noise and capacity factors depend on it).
    """
    return ROUTERS[cfg.router](logits_SE, cfg, uniform_S, training)


__all__ = ["ROUTERS", "Router", "Routing", "deepspeed_gating", "gshard_top2", "load_balance_loss", "route",
           "switch_top1"]
