"""The router table's half that configs need: what each router asks of an ``MoEConfig``.

One ``RouterRule`` per router name: its ``top_k`` rule, the config fields it alone implements,
the second-expert policies it accepts, and its own further checks. It lives below both
``config`` (which validates against it) and ``routing`` (whose ``registry`` says how each router
is called), so that the config imports no router and no router module is needed to validate one.
Adding a router is one entry here and one in ``routing.registry.ROUTERS``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional

ANY_TOP_K = None  # 1 <= top_k <= num_experts; unset means min(DEFAULT_TOP_K, num_experts)
NO_TOP_K = 0  # the router takes no top_k: its K columns are the E experts
DEFAULT_TOP_K = 2


def reject(field: str, value: object, fix: str) -> NoReturn:
    """Raise the ``ValueError`` of an invalid ``MoEConfig`` field: its name, value and the fix."""
    raise ValueError(f"MoEConfig.{field}={value!r} is invalid: {fix}")


# the rule checks read a validated MoEConfig's fields (duck-typed: this module sits below config)
Config = Any


def field_default(cfg: Config, name: str) -> Any:
    """The default of the config field ``name``, read from the dataclass (where it is written once)."""
    return _defaults(type(cfg))[name]


@functools.cache
def _defaults(config_class: type) -> dict[str, Any]:
    return {field.name: field.default for field in dataclasses.fields(config_class)}


@dataclass(frozen=True)
class RouterRule:
    """What one router asks of a config.

    Attributes:
        top_k: the ``top_k`` it requires: a number, ``ANY_TOP_K`` or ``NO_TOP_K``.
        options: ``MoEConfig`` fields that this router alone implements (others must leave them
            at their default).
        second_policies: the ``second_policy`` values it accepts.
        check: its own further validation of a config (raises ``ValueError``), or ``None``.
    """

    top_k: Optional[int]
    options: tuple[str, ...] = ()
    second_policies: tuple[str, ...] = ("random", "all", "threshold")
    check: Optional[Callable[[Config], None]] = None


def check_topk(cfg: Config) -> None:
    """``topk``'s own validation: the groups against ``num_experts`` and ``top_k``; the Mixtral
    gate with softmax scores only. Raises ``ValueError`` naming the field, its value and the fix."""
    per_group = cfg.num_experts // cfg.n_group
    if cfg.num_experts % cfg.n_group:
        reject("n_group", cfg.n_group, f"it does not divide num_experts={cfg.num_experts}; choose a divisor of "
               "num_experts (1 disables group-limited routing)")
    if cfg.topk_group > cfg.n_group:
        reject("topk_group", cfg.topk_group, f"it must lie in [1, n_group={cfg.n_group}]")
    if cfg.num_choices > cfg.topk_group * per_group:
        reject("top_k", cfg.num_choices, f"a token may use topk_group={cfg.topk_group} group(s) of num_experts / "
               f"n_group = {per_group} experts, {cfg.topk_group * per_group} in all; lower top_k or raise "
               "topk_group")
    if cfg.n_group > 1 and cfg.group_score == "top2_sum" and per_group < 2:
        reject("group_score", cfg.group_score, f"it sums each group's two best scores, and n_group={cfg.n_group} "
               "leaves one expert per group; use group_score='max' or fewer groups")
    eps_default = field_default(cfg, "normalize_topk_eps")
    if cfg.normalize_topk_eps != eps_default and (cfg.scoring_func != "sigmoid" or not cfg.normalize_topk):
        reject("normalize_topk_eps", cfg.normalize_topk_eps, "it is the epsilon of normalising sigmoid scores, and "
               f"scoring_func={cfg.scoring_func!r}, normalize_topk={cfg.normalize_topk}; set scoring_func='sigmoid' "
               f"and normalize_topk=True, or leave it at {eps_default}")
    if cfg.normalize_topk_p != 1.0 and (not cfg.normalize_topk or cfg.gate_after_topk or cfg.normalize_topk_p <= 0):
        reject("normalize_topk_p", cfg.normalize_topk_p, "it is the p-norm that normalize_topk=True divides the kept "
               "scores by (without gate_after_topk), and must be > 0; set normalize_topk=True, gate_after_topk="
               "False, or normalize_topk_p=1.0")
    if cfg.gate_after_topk and cfg.scoring_func != "softmax":
        reject("gate_after_topk", True, f"it is the softmax over the kept logits (Mixtral), and scoring_func="
               f"{cfg.scoring_func!r}; set gate_after_topk=False (normalize_topk=True normalises the scores)")
    if cfg.topk_on_logits and (cfg.has_selection_bias or cfg.n_group > 1):
        reject("topk_on_logits", True, "a selection bias and group-limited routing choose by the (biased) scores; "
               "set topk_on_logits=False, or selection_bias=False, bias_update_rate=0 and n_group=1")
    if cfg.normalize_topk_min and (not cfg.normalize_topk or cfg.scoring_func != "softmax" or cfg.gate_after_topk):
        reject("normalize_topk_min", cfg.normalize_topk_min, "it bounds the sum that normalize_topk divides softmax "
               "scores by; set normalize_topk=True with scoring_func='softmax' and gate_after_topk=False, or "
               "normalize_topk_min=0")


def check_soft(cfg: Config) -> None:
    """``soft`` never drops a token (its capacity is the token count): no fixed ``capacity``."""
    if cfg.capacity is not None:
        reject("capacity", cfg.capacity, "router='soft' sends every token to every expert and never "
               "drops one (its capacity is the token count); set capacity=None")


def check_deepspeed(cfg: Config) -> None:
    """The options DeepSpeed's gating takes: Gumbel first choice and random token selection for
    top-1 only, ``"all"`` or ``"gumbel"`` second experts for top-2, and its own capacity rule."""
    top_k = cfg.num_choices
    for name in ("router_gumbel", "random_token_selection"):
        if getattr(cfg, name) and top_k != 1:
            reject(name, True, f"router='deepspeed' implements it with top_k=1 only (got top_k={top_k}); "
                   f"set {name}=False")
    if top_k == 2 and cfg.second_policy not in ("all", "gumbel"):
        reject("second_policy", cfg.second_policy, "router='deepspeed' with top_k=2 takes 'all' "
               "(deterministic top-2) or 'gumbel' (DeepSpeed's top2_2nd_expert_sampling=True)")
    if cfg.capacity is not None:
        reject("capacity", cfg.capacity, "router='deepspeed' derives the capacity per batch as DeepSpeed "
               "does; set capacity=None")
    if cfg.dropless:
        reject("dropless", True, "router='deepspeed' sizes its buffers as DeepSpeed does; use "
               "drop_tokens=False for DeepSpeed's dropless mode")


ROUTER_RULES: dict[str, RouterRule] = {
    "gshard": RouterRule(2),
    "switch": RouterRule(1),
    "topk": RouterRule(ANY_TOP_K, check=check_topk,
                       options=("gate_after_topk", "normalize_topk", "scoring_func", "n_group", "topk_group",
                                "group_score", "routed_scaling_factor", "selection_bias", "bias_update_rate",
                                "topk_on_logits", "normalize_topk_min", "normalize_topk_eps", "normalize_topk_p")),
    "noisy_topk": RouterRule(ANY_TOP_K, options=("importance_loss_weight", "load_loss_weight")),
    "soft": RouterRule(NO_TOP_K, check=check_soft),
    "expert_choice": RouterRule(NO_TOP_K),
    "deepspeed": RouterRule(ANY_TOP_K, options=("router_gumbel", "random_token_selection"),
                            second_policies=("random", "all", "threshold", "gumbel"), check=check_deepspeed),
}


def routed_top_k(router: str, top_k: Optional[int], num_experts: int) -> Optional[int]:
    """The ``top_k`` that ``router`` runs with: the given one, else the router's own (its required
    number, or ``min(DEFAULT_TOP_K, num_experts)``); ``None`` for routers that take none."""
    required = ROUTER_RULES[router].top_k
    if required == NO_TOP_K:
        return None
    if top_k is not None:
        return top_k
    return required or min(DEFAULT_TOP_K, num_experts)
