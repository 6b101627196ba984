"""The router registry: how each router is called. What a router asks of a config (its top-k
rule, the options it owns, its checks) is its ``router_rules.ROUTER_RULES`` entry, below the
config; adding a router is one function, one entry here and one rule there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .choice import gshard_top2, switch_top1, topk
from .deepspeed_gating import deepspeed_gating
from .every_expert import expert_choice, soft
from .noisy import noisy_topk
from .types import Routing


@dataclass(frozen=True)
class RouterSpec:
    """One router.

    Attributes:
        fn: ``fn(logits_SE, **inputs) -> Routing``, pure tensor math.
        inputs: the keyword inputs it reads, each passed by ``route``: the layer's per-call tensors
            (``uniform_S``, ``noise_std_SE``, ``selection_bias_E``), ``training``, ``top_k`` (the
            resolved ``MoEConfig.num_choices``), ``capacity_factor`` (the mode's factor,
            ``MoEConfig.capacity_factor_for``), or any other ``MoEConfig`` field by its name.
        noisy: the ``Router`` module needs a learned noise projection (``noise_weight``).
    """

    fn: Callable[..., Routing]
    inputs: tuple[str, ...] = ()
    noisy: bool = False


ROUTERS: dict[str, RouterSpec] = {
    "gshard": RouterSpec(gshard_top2, inputs=("second_policy", "second_threshold", "uniform_S")),
    "switch": RouterSpec(switch_top1),
    "topk": RouterSpec(topk, inputs=("top_k", "scoring_func", "n_group", "topk_group", "group_score",
                                     "gate_after_topk", "normalize_topk", "routed_scaling_factor",
                                     "selection_bias_E", "normalize_topk_eps")),
    "noisy_topk": RouterSpec(noisy_topk, inputs=("top_k", "training", "noise_std_SE"), noisy=True),
    "soft": RouterSpec(soft),
    "expert_choice": RouterSpec(expert_choice, inputs=("capacity_factor", "min_capacity", "capacity")),
    "deepspeed": RouterSpec(deepspeed_gating, inputs=("top_k", "capacity_factor", "min_capacity", "drop_tokens",
                                                      "second_policy", "router_gumbel", "random_token_selection",
                                                      "training")),
}
