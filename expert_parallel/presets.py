"""Named configurations from the MoE literature: ``presets.NAME(d_model, d_ff, num_experts,
**overrides) -> MoEConfig``. A preset is a config, nothing more; every option stays reachable
through ``MoEConfig`` directly."""

from __future__ import annotations

from typing import Any, Callable

from .config import MoEConfig


def switch(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """Switch Transformer (Fedus et al. 2021): top-1, capacity factor 1.25, aux weight 0.01."""
    base = dict(top_k=1, router="switch", capacity_factor=1.25, eval_capacity_factor=2.0,
                expert="ffn", activation="relu", aux_loss_weight=0.01)
    return MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, **{**base, **overrides})


def gshard(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """GShard (Lepikhin et al. 2020): top-2 with random second-expert dispatch (``2*g2 > u``)."""
    base = dict(top_k=2, router="gshard", second_policy="random", capacity_factor=1.25,
                eval_capacity_factor=2.0, expert="ffn", activation="gelu", aux_loss_weight=0.01)
    return MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, **{**base, **overrides})


PRESETS: dict[str, Callable[..., MoEConfig]] = {"switch": switch, "gshard": gshard}


def preset(name: str, d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """The preset called ``name``; ValueError listing the names if there is none."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name](d_model, d_ff, num_experts, **overrides)
