"""Routing replay (R3): record every MoE layer's chosen experts, then route again through them.

``with record(model) as rec:`` stores each layer's choices per call (small integer tensors, no
host sync); ``with replay(model, rec):`` makes every layer dispatch to the recorded experts, with
the combine weights recomputed from the current router probabilities at those experts and
normalised as the router normalises, so the router keeps learning. With unchanged weights the
output is bit-identical to the recorded forward. The layers are the modules of ``model`` whose
``router`` is a ``Router``; they consult their ``routing_tape`` after routing.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from .choice import _normalized, topk_weights
from .gate import Router
from .types import Routing

# how each router's combine weights follow from its probabilities at the chosen experts
REPLAYABLE = ("switch", "gshard", "topk", "deepspeed")


class RoutingRecord:
    """The recorded choices of every MoE layer, in call order.

    Attributes:
        calls: ``(layer name, expert_SK, active_SK)`` per layer call, in call order; ``expert_SK``
            int16 (int32 past 32767 experts) ``[S, K]``, ``active_SK`` bool ``[S, K]``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Tensor, Tensor]] = []

    def experts(self, name: Optional[str] = None) -> list[Tensor]:
        """The recorded ``expert_SK`` of every call (of layer ``name`` only, if given), in call order."""
        return [expert_SK for layer, expert_SK, _ in self.calls if name is None or layer == name]


class RoutingTape:
    """One layer's link to a ``RoutingRecord``: records its routing, or replays the record."""

    def __init__(self, name: str, record: RoutingRecord, replaying: bool) -> None:
        self.name, self.record, self.replaying = name, record, replaying
        self._next = 0

    def __call__(self, routing: Routing, logits_SE: Tensor, cfg: MoEConfig) -> Routing:
        """Record ``routing`` and return it, or return the recorded choices' ``Routing``."""
        if not self.replaying:
            small = torch.int16 if cfg.num_experts <= torch.iinfo(torch.int16).max else torch.int32
            self.record.calls.append((self.name, routing.expert_SK.detach().to(small),
                                      routing.active_SK.detach().clone()))
            return routing
        mine = [(expert_SK, active_SK) for layer, expert_SK, active_SK in self.record.calls if layer == self.name]
        if self._next >= len(mine):
            raise RuntimeError(f"routing replay: layer {self.name!r} is called {self._next + 1} times, but the record "
                               f"holds {len(mine)} call(s) of it; replay the same forward passes that were recorded")
        expert_SK, active_SK = mine[self._next]
        self._next += 1
        if expert_SK.shape != routing.expert_SK.shape:
            raise ValueError(f"routing replay: layer {self.name!r} routes {tuple(routing.expert_SK.shape)} "
                             f"(tokens, choices) but recorded {tuple(expert_SK.shape)}; replay the same batches")
        return replayed(routing, logits_SE, expert_SK.to(routing.expert_SK.device, torch.long),
                        active_SK.to(routing.active_SK.device), cfg)


def replayed(routing: Routing, logits_SE: Tensor, expert_SK: Tensor, active_SK: Tensor, cfg: MoEConfig) -> Routing:
    """``routing`` (this forward's) dispatched to ``expert_SK`` instead, with the combine weights
    recomputed from this forward's probabilities at those experts, normalised as ``cfg.router``
    normalises (``switch``, ``deepspeed``: the probability itself, DeepSpeed renormalising over the
    kept choices as before; ``gshard``: over the two choices; ``topk``: its own rule, selection
    bias never included). Losses and slot priority stay this forward's. ``[S, K]``, no host sync.
    """
    prob_SK = routing.probs_SE.gather(-1, expert_SK)
    if cfg.router == "gshard":
        weight_SK = _normalized(prob_SK) * active_SK
    elif cfg.router == "topk":
        logits_SE = logits_SE.float()
        score_SK = torch.sigmoid(logits_SE).gather(-1, expert_SK) if cfg.scoring_func == "sigmoid" else prob_SK
        weight_SK = topk_weights(logits_SE, score_SK, expert_SK, cfg.scoring_func, cfg.gate_after_topk,
                                 cfg.normalize_topk, cfg.routed_scaling_factor, cfg.normalize_topk_eps)
    else:
        weight_SK = prob_SK
    return dataclasses.replace(routing, expert_SK=expert_SK, weight_SK=weight_SK, active_SK=active_SK)


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every MoE layer of ``model``: the modules whose ``router`` is a ``Router``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(getattr(module, "router", None),
                                                                                    Router)]


@contextmanager
def _taped(model: nn.Module, record: RoutingRecord, replaying: bool) -> Iterator[RoutingRecord]:
    layers = moe_layers(model)
    for name, layer in layers:
        if layer.cfg.router not in REPLAYABLE:
            raise ValueError(f"routing replay: layer {name!r} uses router={layer.cfg.router!r}, whose choices are not "
                             f"per-token top-k picks; record/replay takes routers {list(REPLAYABLE)}")
    for name, layer in layers:
        layer.routing_tape = RoutingTape(name, record, replaying)
    try:
        yield record
    finally:
        for _, layer in layers:
            layer.routing_tape = None


def record(model: nn.Module) -> Iterator[RoutingRecord]:
    """``with record(model) as rec:`` stores every MoE layer's chosen experts in ``rec`` (a
    ``RoutingRecord``), per call, in call order. No host sync; one small copy per layer call.

    Raises:
        ValueError: a layer's router does not choose per token (``soft``, ``expert_choice``,
            ``noisy_topk``).
    """
    return _taped(model, RoutingRecord(), replaying=False)


def replay(model: nn.Module, rec: RoutingRecord) -> Iterator[RoutingRecord]:
    """``with replay(model, rec):`` every MoE layer dispatches each call to the experts ``rec``
    recorded for that layer's call of the same rank (call order per layer), with combine weights
    from the current router (``replayed``). Same weights and input: bit-identical output.

    Raises:
        ValueError: a router ``record`` refuses, or a call routes another number of tokens.
        RuntimeError: a layer is called more often than it was recorded.
    """
    return _taped(model, rec, replaying=True)
