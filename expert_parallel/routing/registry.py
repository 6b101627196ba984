"""The one router registry: each entry says how a router is called, its top-k rule and the
options it owns, so adding a router is one function and one entry here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import MoEConfig, reject
from .choice import check_topk, gshard_top2, switch_top1, topk
from .deepspeed_gating import check_deepspeed, deepspeed_gating
from .every_expert import check_soft, expert_choice, soft
from .noisy import noisy_topk
from .types import Routing

ANY_TOP_K = None  # 1 <= top_k <= num_experts; unset means min(2, num_experts)
NO_TOP_K = 0  # the router takes no top_k: its K columns are the E experts
DEFAULT_TOP_K = 2
# what "leave it at its default" compares against
DEFAULTS = {field.name: field.default for field in dataclasses.fields(MoEConfig)}


@dataclass(frozen=True)
class RouterSpec:
    """One router.

    Attributes:
        fn: ``fn(logits_SE, cfg, **inputs) -> Routing``, pure tensor math.
        top_k: the ``top_k`` it requires: a number, ``ANY_TOP_K`` or ``NO_TOP_K``.
        inputs: the keyword inputs of ``route`` it reads (``uniform_S``, ``training``,
            ``noise_std_SE``, ``selection_bias_E``); ``route`` passes only those.
        options: ``MoEConfig`` fields that this router alone implements (others must leave them
            at their default).
        second_policies: the ``second_policy`` values it accepts.
        noisy: the ``Router`` module needs a learned noise projection (``noise_weight``).
        check: its own further validation of a config (raises ``ValueError``), or ``None``.
    """

    fn: Callable[..., Routing]
    top_k: Optional[int]
    inputs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    second_policies: tuple[str, ...] = ("random", "all", "threshold")
    noisy: bool = False
    check: Optional[Callable[[MoEConfig], None]] = None


ROUTERS: dict[str, RouterSpec] = {
    "gshard": RouterSpec(gshard_top2, 2, inputs=("uniform_S",)),
    "switch": RouterSpec(switch_top1, 1),
    "topk": RouterSpec(topk, ANY_TOP_K, inputs=("selection_bias_E",), check=check_topk,
                       options=("gate_after_topk", "normalize_topk", "scoring_func", "n_group", "topk_group",
                                "group_score", "routed_scaling_factor", "selection_bias", "bias_update_rate")),
    "noisy_topk": RouterSpec(noisy_topk, ANY_TOP_K, inputs=("training", "noise_std_SE"), noisy=True,
                             options=("importance_loss_weight", "load_loss_weight")),
    "soft": RouterSpec(soft, NO_TOP_K, check=check_soft),
    "expert_choice": RouterSpec(expert_choice, NO_TOP_K, inputs=("training",)),
    "deepspeed": RouterSpec(deepspeed_gating, ANY_TOP_K, inputs=("training",),
                            options=("router_gumbel", "random_token_selection"),
                            second_policies=("random", "all", "threshold", "gumbel"), check=check_deepspeed),
}


def validate_router(cfg: MoEConfig) -> None:
    """Check ``cfg.router`` and everything the router registry says about it; fills in an unset
    ``top_k``. Called once by ``MoEConfig.__post_init__``.

    Raises:
        ValueError: naming the field, its value and the fix.
    """
    if cfg.router not in ROUTERS:
        reject("router", cfg.router, f"choose one of {sorted(ROUTERS)}")
    spec = ROUTERS[cfg.router]
    _resolve_top_k(cfg, spec.top_k)
    for name, other in ROUTERS.items():
        for option in other.options:
            if option not in spec.options and getattr(cfg, option) != DEFAULTS[option]:
                reject(option, getattr(cfg, option), f"it is implemented by router={name!r} only (got "
                       f"router={cfg.router!r}); leave it at its default or set router={name!r}")
    if cfg.second_policy not in spec.second_policies:
        reject("second_policy", cfg.second_policy, f"router={cfg.router!r} takes one of "
               f"{list(spec.second_policies)}")
    if spec.check is not None:
        spec.check(cfg)


def _resolve_top_k(cfg: MoEConfig, required_k: Optional[int]) -> None:
    """Fill in the router's own ``top_k`` when it is unset; check one that is set."""
    if required_k == NO_TOP_K:
        if cfg.dropless:
            reject("dropless", True, f"router={cfg.router!r} sizes its own buffers (each expert takes a set "
                   "number of tokens, or all of them) and never drops a picked token; set dropless=False")
        if cfg.top_k is not None:
            reject("top_k", cfg.top_k, f"router={cfg.router!r} takes no top_k (its choices are the "
                   "experts themselves; capacity_factor sets how many tokens an expert takes); leave "
                   "top_k unset (None)")
        return
    if cfg.top_k is None:  # frozen dataclass: the one place a field is filled in
        object.__setattr__(cfg, "top_k", required_k or min(DEFAULT_TOP_K, cfg.num_experts))
    if not isinstance(cfg.top_k, int) or isinstance(cfg.top_k, bool) or not 1 <= cfg.top_k <= cfg.num_experts:
        reject("top_k", cfg.top_k, f"it must be between 1 and num_experts={cfg.num_experts}")
    if required_k is not None and cfg.top_k != required_k:
        reject("top_k", cfg.top_k, f"router={cfg.router!r} routes top-{required_k}; set top_k={required_k}")

