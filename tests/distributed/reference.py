"""Independent references and shared case data for the distributed tests.

Every spawned rank and the parent test process build the same full weights, tokens, cotangents
and router uniforms from a ``Case`` (seeded generators), so the parent can recompute each rank's
result on one process and compare. The reference is a plain float64 loop over tokens that follows
the documented semantics (docs/design.md); it shares no routing, layout or comm code
with the library. ``ep1_layer_run`` is the other reference the issue asks for: the EP=1 layer with
the same full weights and the same capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from expert_parallel import MoEConfig, MoELayer
from tests.unit.reference import capacity_formula as unit_capacity_formula

EXPERT_PARAMS = ("w1", "w2", "w3", "b1", "b2")
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
# float32 library vs float64 reference
TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


@dataclass(frozen=True)
class Case:
    """One distributed scenario: config, per-rank token shapes, and what to run.

    Attributes:
        name: test id.
        ep_size: expert-parallel group size.
        tokens: leading shape of ``x`` on every rank (``x`` is ``[*tokens[r], d_model]``).
        options: extra ``MoEConfig`` fields.
        seed: seeds the weights, tokens, cotangents and router uniforms.
        skew: added to every token and to router row 0, so expert 0 is overloaded.
        eval: run the forward in eval mode.
        backward: run ``loss.backward()`` (``loss = <y, cotangent> + aux_loss``).
        reduce: call ``reduce_gradients`` after backward.
        nan_rank: this rank's first token is NaN (forward only).
        build: how the layer is made before it runs: ``"plain"``; ``"meta"`` (built on the meta
            device, then ``to_empty``); ``"assign"`` (a fresh layer takes the loaded weights by
            ``load_state_dict(assign=True)``); ``"deepcopy"``; ``"compile"`` (``torch.compile``,
            the compiled module runs and is reduced).
        groups: the EP groups when they are not the library's consecutive blocks (the test then
            passes each rank's group as ``ep_group``); ``None``: consecutive blocks.
    """

    name: str
    ep_size: int
    tokens: tuple
    num_experts: int = 4
    d_model: int = 8
    d_ff: int = 12
    options: dict = field(default_factory=dict)
    seed: int = 0
    skew: float = 0.0
    eval: bool = False
    backward: bool = True
    reduce: bool = False
    nan_rank: Optional[int] = None
    build: str = "plain"
    groups: Optional[tuple[tuple[int, ...], ...]] = None

    def config(self, **changes: Any) -> MoEConfig:
        fields = dict(d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts,
                      ep_size=self.ep_size, aux_loss_weight=0.1, min_capacity=1)
        fields.update(self.options)
        fields.update(changes)
        return MoEConfig(**fields)

    @property
    def world_size(self) -> int:
        return len(self.tokens)

    def ep_groups(self) -> list[tuple[int, ...]]:
        """``groups`` if given, else consecutive rank blocks, as the library documents."""
        if self.groups is not None:
            return [tuple(group) for group in self.groups]
        return [tuple(range(s, s + self.ep_size)) for s in range(0, self.world_size, self.ep_size)]

    def ep_group_of(self, rank: int) -> tuple[int, ...]:
        """The EP group (global ranks, in EP order) that ``rank`` belongs to."""
        return next(group for group in self.ep_groups() if rank in group)

    def num_tokens(self, rank: int) -> int:
        return math.prod(self.tokens[rank])


def full_weights(case: Case) -> dict[str, Tensor]:
    """The full (all experts) float32 weights of ``case``, by reference name."""
    cfg = case.config()
    gen = torch.Generator().manual_seed(case.seed)
    E, D, Fd = cfg.num_experts, cfg.d_model, cfg.d_ff
    weights = {
        "router": torch.randn(E, D, generator=gen) * 0.7,
        "w1": torch.randn(E, D, Fd, generator=gen) / math.sqrt(D),
        "w2": torch.randn(E, Fd, D, generator=gen) / math.sqrt(Fd),
    }
    if cfg.expert == "swiglu":
        weights["w3"] = torch.randn(E, D, Fd, generator=gen) / math.sqrt(D)
    if cfg.expert_bias:
        weights["b1"] = torch.randn(E, Fd, generator=gen) * 0.1
        weights["b2"] = torch.randn(E, D, generator=gen) * 0.1
    weights["router"][0] += case.skew
    return weights


def tokens(case: Case, rank: int) -> Tensor:
    gen = torch.Generator().manual_seed(case.seed * 1000 + rank + 1)
    x = torch.randn(*case.tokens[rank], case.d_model, generator=gen) + case.skew
    if case.nan_rank == rank and x.numel():
        x.view(-1, case.d_model)[0, 0] = float("nan")
    return x


def cotangent(case: Case, rank: int) -> Tensor:
    gen = torch.Generator().manual_seed(case.seed * 1000 + rank + 500)
    return torch.randn(*case.tokens[rank], case.d_model, generator=gen)


def uniform_seed(case: Case, rank: int) -> int:
    """Global seed set right before the layer call; the layer's ``torch.rand([S])`` is its first draw."""
    return case.seed * 1000 + rank + 77


def load_layer(layer: MoELayer, weights: dict[str, Tensor], ep_rank: int) -> None:
    """Copy the full weights into ``layer``: the router whole, experts the slice of ``ep_rank``."""
    local = layer.cfg.num_local_experts
    part = slice(ep_rank * local, (ep_rank + 1) * local)
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        for name in EXPERT_PARAMS:
            param = getattr(layer.experts, name)
            if param is not None:
                param.copy_(weights[name][part])


def capacity_formula(num_tokens: int, cfg: MoEConfig, factor: float) -> int:
    """``C = max(min_capacity, ceil(k * S * cf / E), 1)`` as documented, for ``cfg`` (the one
    reference formula, exact fractions: ``tests.unit.reference.capacity_formula``)."""
    return unit_capacity_formula(num_tokens, cfg.num_experts, cfg.num_choices, factor, cfg.min_capacity)


def _expert(v_D: Tensor, weights: dict[str, Tensor], e: int, cfg: MoEConfig) -> Tensor:
    hidden = v_D @ weights["w1"][e]
    if "b1" in weights:
        hidden = hidden + weights["b1"][e]
    if cfg.expert == "swiglu":
        hidden = F.silu(hidden) * (v_D @ weights["w3"][e])
    else:
        hidden = ACTIVATIONS[cfg.activation](hidden)
    out = hidden @ weights["w2"][e]
    if "b2" in weights:
        out = out + weights["b2"][e]
    return out


def _choices(probs_SE: Tensor, cfg: MoEConfig, uniform_S: Tensor) -> list[list[tuple[int, int, Tensor]]]:
    """Per choice rank, the dispatched (token, expert, weight) in token order."""
    first, second = [], []
    for s in range(probs_SE.shape[0]):
        p = probs_SE[s]
        order = sorted(range(p.numel()), key=lambda e: float(p[e].detach()), reverse=True)
        if cfg.router == "switch":
            first.append((s, order[0], p[order[0]]))
            continue
        p1, p2 = p[order[0]], p[order[1]]
        g1, g2 = p1 / (p1 + p2), p2 / (p1 + p2)
        first.append((s, order[0], g1))
        if cfg.second_policy == "all":
            take = True
        elif cfg.second_policy == "threshold":
            take = float(g2.detach()) > cfg.second_threshold
        else:
            take = 2.0 * float(g2.detach()) > float(uniform_S[s])
        if take:
            second.append((s, order[1], g2))
    return [first, second] if cfg.router == "gshard" else [first]


def reference_forward(x_SD: Tensor, weights: dict[str, Tensor], cfg: MoEConfig,
                      capacity: Optional[int], uniform_S: Tensor) -> dict[str, Any]:
    """Plain loop: route, fill slots choice-major in token order, drop past ``capacity``.

    Returns ``y`` [S, D], ``aux`` (weighted), ``count`` per expert before capacity,
    ``dispatched`` and ``dropped`` assignment counts.
    """
    S, E = x_SD.shape[0], cfg.num_experts
    probs_SE = torch.softmax(x_SD @ weights["router"].t(), dim=-1)
    choices = _choices(probs_SE, cfg, uniform_S)
    fill, count = [0] * E, [0] * E
    rows: list[list[Tensor]] = [[] for _ in range(S)]
    dispatched = dropped = 0
    for per_choice in choices:
        for s, e, w in per_choice:
            count[e] += 1
            dispatched += 1
            if capacity is not None and fill[e] >= capacity:
                dropped += 1
                continue
            fill[e] += 1
            rows[s].append(w * _expert(x_SD[s], weights, e, cfg))
    zero = x_SD.new_zeros(x_SD.shape[1])
    y = torch.stack([sum(r, zero) for r in rows]) if S else x_SD.new_zeros(0, x_SD.shape[1])
    if S:
        first_E = torch.bincount(torch.tensor([e for _, e, _ in choices[0]]), minlength=E)
        aux = E * (first_E.to(probs_SE.dtype) / S * probs_SE.mean(dim=0)).sum()
    else:
        aux = x_SD.new_zeros(())
    return {"y": y, "aux": aux * cfg.aux_loss_weight, "count": torch.tensor(count),
            "dispatched": dispatched, "dropped": dropped}


def reference_rank(case: Case, rank: int, capacity: Optional[int],
                   backward: bool = True) -> dict[str, Any]:
    """The reference forward (float64) of ``rank``'s tokens and the gradients of its loss."""
    cfg = case.config()
    params = {k: v.double().requires_grad_() for k, v in full_weights(case).items()}
    x = tokens(case, rank).double().requires_grad_()
    torch.manual_seed(uniform_seed(case, rank))
    uniform_S = torch.rand(case.num_tokens(rank))
    out = reference_forward(x.reshape(-1, case.d_model), params, cfg, capacity, uniform_S)
    out["y"] = out["y"].reshape(x.shape)
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    grads["x"] = torch.zeros_like(x)
    if backward and x.numel():
        loss = (out["y"] * cotangent(case, rank).double()).sum() + out["aux"]
        names = list(params) + ["x"]
        found = torch.autograd.grad(loss, list(params.values()) + [x], allow_unused=True)
        grads.update({n: g for n, g in zip(names, found) if g is not None})
    out["grads"] = {n: g.detach() for n, g in grads.items()}
    out["y"], out["aux"] = out["y"].detach(), out["aux"].detach()
    return out


def ep1_layer_run(case: Case, rank: int, capacity: int) -> dict[str, Any]:
    """The EP=1 layer with the full weights and a fixed ``capacity`` on ``rank``'s tokens."""
    layer = MoELayer(case.config(ep_size=1, capacity=capacity, drop_tokens=True, dropless=False,
                                 max_tokens_per_rank=None))
    load_layer(layer, full_weights(case), 0)
    layer.train(not case.eval)
    x = tokens(case, rank).requires_grad_()
    torch.manual_seed(uniform_seed(case, rank))
    out = layer(x)
    if case.backward and x.numel():
        ((out.output * cotangent(case, rank)).sum() + out.aux_loss).backward()
    grads = {reference_name(n): p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in layer.named_parameters()}
    grads["x"] = x.grad if x.grad is not None else torch.zeros_like(x)
    return {"y": out.output.detach(), "aux": out.aux_loss.detach(), "grads": grads}


def reference_name(param_name: str) -> str:
    """``router.weight`` -> ``router``, ``experts.w1`` -> ``w1``."""
    return "router" if param_name == "router.weight" else param_name.split(".")[-1]
