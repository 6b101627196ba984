"""Skewed routing (``--skew ALPHA``): router weights and tokens that give every runtime the same
Zipf-like expert loads, as early in training, when a few experts take most of the tokens.

Expert ``i`` gets a share of the routed choices roughly proportional to ``1 / (i + 1)^alpha``
(expert 0 the busiest, so EP rank 0 holds the hottest experts: the slowest rank's worst case).
A bias-free linear router has no per-expert offset, so the tokens carry one: every token's
component along a fixed unit direction ``u`` is set to 1 (``x - (x.u) u + u``), and router row
``e`` is ``w_e + b_e u`` with ``w_e`` orthogonal to ``u``, so the logits are ``x.w_e + b_e``
exactly. The offsets ``b`` are fitted to the Zipf shares on a fixed sample of such tokens (top-k
counts, a few hundred cheap steps). ``w``, ``u``, the sample and the fit are all drawn from
generators seeded by the spec, so the same spec gives bit-identical router weights in every
process: our layer, its padded copy, DeepSpeed's MoE and AutoEP all get them (``set_router``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from .shapes import RunSpec, Shape

FIT_TOKENS = 8192
FIT_STEPS = 150


def zipf_shares(num_experts: int, alpha: float) -> Tensor:
    """``[E]`` shares ``(i + 1)^-alpha`` normalised to sum 1 (uniform for ``alpha = 0``)."""
    weights = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-alpha)
    return (weights / weights.sum()).float()


def _base(shape: Shape, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The unit direction ``u [D]``, router rows ``w [E, D]`` orthogonal to it (``Router``'s
    uniform init) and fitting tokens ``z [FIT_TOKENS, D]`` orthogonal to it, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    u_D = torch.randn(shape.d_model, generator=generator)
    u_D = u_D / u_D.norm()
    bound = 1.0 / math.sqrt(shape.d_model)
    w_ED = torch.empty(shape.experts, shape.d_model).uniform_(-bound, bound, generator=generator)
    z_ND = torch.randn(FIT_TOKENS, shape.d_model, generator=generator)
    return u_D, w_ED - torch.outer(w_ED @ u_D, u_D), z_ND - torch.outer(z_ND @ u_D, u_D)


def _fit_offsets(logits_NE: Tensor, top_k: int, shares_E: Tensor) -> Tensor:
    """Per-expert offsets ``b [E]`` such that the top-k of ``logits + b`` picks expert ``e`` about
    ``top_k * N * shares_E[e]`` times (a token takes an expert at most once, so each target is
    capped at ``N``). Multiplicative updates of the counts, deterministic."""
    tokens, experts = logits_NE.shape
    target_E = (top_k * tokens * shares_E).clamp(max=tokens)
    offsets_E = torch.zeros(experts)
    for _ in range(FIT_STEPS):
        picked = (logits_NE + offsets_E).topk(top_k, dim=1).indices
        count_E = torch.bincount(picked.reshape(-1), minlength=experts).float()
        offsets_E = (offsets_E + 0.1 * (torch.log1p(target_E) - torch.log1p(count_E))).clamp(-30.0, 30.0)
    return offsets_E - offsets_E.mean()


@lru_cache(maxsize=16)
def _router_weight(shape: Shape, seed: int, alpha: float) -> tuple[Tensor, Tensor]:
    u_D, w_ED, z_ND = _base(shape, seed)
    offsets_E = _fit_offsets(z_ND @ w_ED.t(), shape.top_k, zipf_shares(shape.experts, alpha))
    return w_ED + torch.outer(offsets_E, u_D), u_D


def router_weight(spec: RunSpec) -> Tensor:
    """The skewed router weight ``[E, D]`` (fp32, CPU) for ``spec`` (its shape, seed and ``skew``);
    a pure function of them. Raises ``ValueError`` for ``spec.skew <= 0`` (nothing to skew)."""
    if not spec.skew > 0:
        raise ValueError(f"skew={spec.skew} gives no skewed router; use skew > 0 (e.g. --skew 1.0)")
    return _router_weight(spec.shape, spec.seed, float(spec.skew))[0].clone()


def skew_tokens(x_SD: Tensor, spec: RunSpec) -> Tensor:
    """``x`` with its component along the skew direction set to 1 (the offset every skewed router
    row reads); computed in fp32, returned in ``x``'s dtype. ``x`` unchanged for ``skew == 0``."""
    if not spec.skew > 0:
        return x_SD
    u_D = _router_weight(spec.shape, spec.seed, float(spec.skew))[1].to(x_SD.device)
    x32 = x_SD.float()
    return (x32 - torch.outer(x32 @ u_D, u_D) + u_D).to(x_SD.dtype)


@torch.no_grad()
def set_router(weight_ED: Tensor, spec: RunSpec) -> None:
    """Copy the skewed router weight into a runtime's router weight ``[E, D]`` (any device and
    dtype; nn.Linear's layout) when ``spec.skew > 0``; a no-op otherwise."""
    if spec.skew > 0:
        weight_ED.copy_(router_weight(spec))
