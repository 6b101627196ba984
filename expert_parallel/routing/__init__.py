"""Routing: logits ``[S, E]`` -> ``Routing`` (pure tensor math, no collectives)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor

from ..config import MoEConfig
from .balance import selection_bias_step
from .choice import gshard_top2, limit_to_groups, switch_top1, topk
from .deepspeed_gating import deepspeed_gating
from .every_expert import expert_choice, soft
from .gate import Router
from .losses import (
    cv_squared,
    global_balance_loss,
    load_balance_loss,
    sequence_balance_loss,
    weighted_aux_loss,
    z_loss,
)
from .noisy import noisy_topk
from .registry import ROUTERS, RouterSpec
from .replay import RoutingRecord, record, replay
from .types import Routing


def route(logits_SE: Tensor, cfg: MoEConfig, uniform_S: Optional[Tensor] = None,
          training: bool = True, noise_std_SE: Optional[Tensor] = None,
          selection_bias_E: Optional[Tensor] = None) -> Routing:
    """Route ``S`` tokens with the router named by ``cfg.router``, passing it the inputs its
    ``RouterSpec`` names (from the arguments and ``cfg``); add the z-loss if it is weighed.

    Pure tensor math; syncs the host only where a router's capacity needs it (none of the
    token-choice routers does).

    Args:
        logits_SE: router logits ``[S, E]``.
        cfg: the layer config.
        uniform_S: optional injected ``U(0, 1)`` noise ``[S]`` for GShard's random second expert.
        training: the layer's mode (training-only noise and capacity factors depend on it).
        noise_std_SE: ``noisy_topk``'s noise scale ``[S, E]`` (``Router`` gives it).
        selection_bias_E: ``topk``'s selection bias ``[E]`` (``Router.selection_bias``), or ``None``.

    Returns:
        The router's ``Routing``; with ``cfg.z_loss_weight > 0`` its ``losses`` hold ``"z"``.
    """
    spec = ROUTERS[cfg.router]
    given = {"uniform_S": uniform_S, "training": training, "noise_std_SE": noise_std_SE,
             "selection_bias_E": selection_bias_E, "top_k": cfg.num_choices,
             "capacity_factor": cfg.capacity_factor_for(training)}
    routing = spec.fn(logits_SE, **{name: given[name] if name in given else getattr(cfg, name)
                                    for name in spec.inputs})
    if cfg.z_loss_weight:
        routing = dataclasses.replace(routing, losses={**routing.losses, "z": z_loss(logits_SE)})
    return routing


__all__ = ["ROUTERS", "Router", "RouterSpec", "Routing", "RoutingRecord", "cv_squared", "deepspeed_gating",
           "expert_choice", "global_balance_loss", "gshard_top2", "limit_to_groups", "load_balance_loss", "noisy_topk",
           "record", "replay", "route", "selection_bias_step", "sequence_balance_loss", "soft", "switch_top1", "topk",
           "weighted_aux_loss", "z_loss"]
