"""Named configurations from the MoE literature: ``presets.NAME(d_model, d_ff, num_experts,
**overrides) -> MoEConfig``. A preset is a config, nothing more; every option stays reachable
through ``MoEConfig`` directly, and ``overrides`` win over the preset's values. docs/routers.md
describes each router and cites the papers.

Placement is the model builder's business, not the layer's: GLaM (and GShard, Switch, ST-MoE)
put an MoE layer in every other Transformer block and a dense FFN in the others.
"""

from __future__ import annotations

from typing import Any, Callable

from .config import MoEConfig

# Hugging Face's MixtralConfig.router_aux_loss_coef (its default); it weighs a loss top_k times ours
MIXTRAL_ROUTER_AUX_LOSS_COEF = 1e-3


def _config(d_model: int, d_ff: int, num_experts: int, base: dict, overrides: dict) -> MoEConfig:
    return MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, **{**base, **overrides})


def switch(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """Switch Transformer (Fedus et al. 2021): top-1, ReLU FFN experts (T5's), capacity factor 1.25 in
    training and 2.0 in eval, load-balancing loss weight alpha = 1e-2, overflow tokens dropped."""
    base = dict(top_k=1, router="switch", capacity_factor=1.25, eval_capacity_factor=2.0,
                expert="ffn", activation="relu", aux_loss_weight=0.01)
    return _config(d_model, d_ff, num_experts, base, overrides)


def gshard(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """GShard (Lepikhin et al. 2020): top-2 with random second-expert dispatch (``2*g2 > u``,
    Algorithm 1), ReLU FFN experts (``wo ReLU(wi x)``, eq. 2), expert capacity ``2S/E`` per group
    (capacity factor 1.0 here, in training and eval alike: GShard has one capacity), aux weight
    1e-2 (the reference implementation's ``aux_loss_coef``, on the ``E^2``-scaled loss that equals
    ours), overflow tokens dropped."""
    base = dict(top_k=2, router="gshard", second_policy="random", capacity_factor=1.0,
                eval_capacity_factor=1.0, expert="ffn", activation="relu", aux_loss_weight=0.01)
    return _config(d_model, d_ff, num_experts, base, overrides)


def shazeer(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """Sparsely-gated MoE (Shazeer et al. 2017): noisy top-4, ReLU experts, importance and load
    losses weighted 0.1 each, no capacity drops (the paper has no capacity)."""
    base = dict(router="noisy_topk", top_k=min(4, num_experts), expert="ffn", activation="relu",
                drop_tokens=False, aux_loss_weight=0.0, importance_loss_weight=0.1, load_loss_weight=0.1)
    return _config(d_model, d_ff, num_experts, base, overrides)


def glam(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """GLaM (Du et al. 2022): GShard top-2 gating (as ``gshard``); the MoE layer goes in every other
    block (the model builder places it). GLaM's experts are gated-GELU; ``expert="ffn"`` with GELU
    here."""
    return gshard(d_model, d_ff, num_experts, **{"activation": "gelu", **overrides})


def st_moe(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """ST-MoE (Zoph et al. 2022): top-2 on the full softmax, load-balancing loss 1e-2, router
    z-loss 1e-3, capacity factor 1.25 (2.0 in eval)."""
    base = dict(router="topk", top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, expert="ffn",
                activation="gelu", aux_loss_weight=1e-2, z_loss_weight=1e-3)
    return _config(d_model, d_ff, num_experts, base, overrides)


def mixtral(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """Mixtral (Jiang et al. 2024): top-2, softmax over the two kept logits, SwiGLU experts, no
    capacity drops (buffers sized to the fullest expert).

    Load balancing: Hugging Face's Mixtral weighs its ``load_balancing_loss_func`` by
    ``router_aux_loss_coef = 1e-3`` (``MixtralConfig``'s default), and that loss is ``top_k`` times
    ours (it averages the choices over the ``S`` tokens, ours over the ``S * k`` choices), so
    ``aux_loss_weight = 1e-3 * top_k``: 2e-3 at top-2, and the overridden ``top_k``'s value when
    ``top_k`` is overridden. An explicit ``aux_loss_weight`` override wins.
    """
    base = dict(router="topk", top_k=2, gate_after_topk=True, expert="swiglu", drop_tokens=False)
    cfg = _config(d_model, d_ff, num_experts, base, overrides)
    if "aux_loss_weight" in overrides:
        return cfg
    return cfg.replace(aux_loss_weight=MIXTRAL_ROUTER_AUX_LOSS_COEF * cfg.num_choices)


def deepseek(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """DeepSeekMoE (Dai et al. 2024): fine-grained experts (many, small ``d_ff``), top-6 (of 64),
    2 shared experts of the same width, SwiGLU, unnormalised gates, expert-balance loss 1e-3, no
    capacity drops. DeepSeekMoE 16B: ``deepseek(2048, 1408, 64)``.

    The expert-level balance loss ``alpha_1 * sum_i f_i P_i`` with ``f_i = E / (K T) * count_i`` is
    ``alpha_1`` times our ``load_balance`` loss, so ``aux_loss_weight = alpha_1 = 1e-3``."""
    base = dict(router="topk", top_k=min(6, num_experts), num_shared_experts=2, expert="swiglu",
                drop_tokens=False, aux_loss_weight=1e-3)
    return _config(d_model, d_ff, num_experts, base, overrides)


def expert_choice(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """Expert-choice routing (Zhou et al. 2022), EC-CF2: each expert picks ``2 * S / E`` tokens;
    no balancing loss."""
    base = dict(router="expert_choice", capacity_factor=2.0, eval_capacity_factor=2.0, expert="ffn",
                activation="gelu", aux_loss_weight=0.0)
    return _config(d_model, d_ff, num_experts, base, overrides)


def soft(d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """Dense soft mixture of experts (Jacobs et al. 1991): every token to every expert, weighted
    by the softmax gate; no capacity, no drops, no balancing loss."""
    base = dict(router="soft", expert="ffn", activation="gelu", aux_loss_weight=0.0)
    return _config(d_model, d_ff, num_experts, base, overrides)


PRESETS: dict[str, Callable[..., MoEConfig]] = {
    "switch": switch, "gshard": gshard, "shazeer": shazeer, "glam": glam, "st_moe": st_moe,
    "mixtral": mixtral, "deepseek": deepseek, "expert_choice": expert_choice, "soft": soft,
}


def preset(name: str, d_model: int, d_ff: int, num_experts: int, **overrides: Any) -> MoEConfig:
    """The preset called ``name``; ValueError listing the names if there is none."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name](d_model, d_ff, num_experts, **overrides)
