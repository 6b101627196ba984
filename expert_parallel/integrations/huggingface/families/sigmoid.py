"""Sigmoid-router families (and Mistral 4's softmax twin of DeepSeek-V3's router): GLM-4-MoE,
GLM-4-MoE-Lite, dots.llm1, EXAONE-MoE, Solar Open (DeepSeek-V3's router and block under other
names), Mistral 4, MiniMax-M2, AFMoE, Hunyuan-V3 and Laguna: sigmoid top-k with a selection bias,
with or without groups (Laguna's logits soft-capped), normalised and scaled, over SwiGLU experts
with or without shared experts."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..specs import ROUTER, SWIGLU_EXPERTS, TOPK_SWIGLU, BlockSpec, TinySizes, WeightMap, shared_mlp
from .classic import DEEPSEEK_V3, _mla

# DeepSeek-V3's router without groups: sigmoid scores, a selection bias HF never updates, normalised
SIGMOID_BIAS = (*TOPK_SWIGLU, ("scoring_func", "sigmoid"), ("selection_bias", True), ("bias_update_rate", 0.0),
                ("normalize_topk", True))
# the routing options a tiny model turns on (DeepSeek-V3's: 4 groups of 2 kept, normalised, scaled)
V3_ROUTING = dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)


def _dense_first(sizes: TinySizes) -> dict[str, Any]:
    """One dense first layer (``first_k_dense_replace`` or the ``mlp_layer_types`` derived from it)
    and two sparse ones after it, two shared experts, DeepSeek-V3's routing options."""
    return dict(num_hidden_layers=sizes.layers + 1, first_k_dense_replace=1, n_shared_experts=2, **V3_ROUTING)


def _mla_lite(sizes: TinySizes) -> dict[str, Any]:
    """GLM-4-MoE-Lite: DeepSeek's tiny MLA model; its dense first layer is ``mlp_layer_types``."""
    fields = {key: value for key, value in _mla(sizes).items() if key != "first_k_dense_replace"}
    return {**fields, "mlp_layer_types": ["dense"] + ["sparse"] * sizes.layers, **V3_ROUTING}


def _shared_experts_config(scale: str) -> tuple[tuple[str, str], ...]:
    """The config map of AFMoE and Hunyuan-V3: ``num_shared_experts`` shared experts of the routed
    experts' width, the routed scaling factor under the attribute ``scale``."""
    return (("d_model", "hidden_size"), ("d_ff", "moe_intermediate_size"), ("num_experts", "num_experts"),
            ("top_k", "num_experts_per_tok"), ("routed_scaling_factor", scale),
            ("num_shared_experts", "num_shared_experts"), ("d_ff_shared", "moe_intermediate_size"))


def _v3_named(name: str, block: str, **changes: Any) -> BlockSpec:
    """DeepSeek-V3's spec for a family whose router and block are DeepSeek-V3's under other names."""
    return dataclasses.replace(DEEPSEEK_V3, name=name, block=block, **changes)


GLM4_MOE = _v3_named("glm4_moe", "Glm4MoeMoE", tiny=_dense_first)

GLM4_MOE_LITE = _v3_named("glm4_moe_lite", "Glm4MoeLiteMoE", tiny=_mla_lite)

DOTS1 = _v3_named("dots1", "Dots1MoE", tiny=_dense_first)

SOLAR_OPEN = _v3_named("solar_open", "SolarOpenMoE", tiny=lambda sizes: {"n_shared_experts": 2, **V3_ROUTING})

EXAONE_MOE = _v3_named(
    "exaone_moe", "ExaoneMoeSparseMoEBlock",
    config=tuple((field, {"n_routed_experts": "num_experts", "n_shared_experts": "num_shared_experts"}.get(attr, attr))
                 for field, attr in DEEPSEEK_V3.config),
    tiny=lambda sizes: dict(num_hidden_layers=sizes.layers + 1, num_shared_experts=2, **V3_ROUTING))

MISTRAL4 = BlockSpec(
    name="mistral4", block="Mistral4MoE",
    config=DEEPSEEK_V3.config,
    # DeepSeek-V3's groups on softmax scores (no selection bias); HF masks left-out groups to 0.0
    fixed=(*TOPK_SWIGLU, ("scoring_func", "softmax"), ("group_score", "top2_sum")),
    weights=(ROUTER, *SWIGLU_EXPERTS, *shared_mlp("shared_experts")),
    archetype="softmax top-k, group-limited (top-2 sum), renormalised, scaled; SwiGLU + shared experts",
    # Mistral 4's rotary width is head_dim * qk_rope / (qk_nope + qk_rope): head_dim is their sum
    tiny=lambda sizes: {**_mla(sizes), "head_dim": 2 * (sizes.d_model // sizes.heads), "norm_topk_prob": True,
                        "routed_scaling_factor": 2.0},
)

MINIMAX_M2 = BlockSpec(
    name="minimax_m2", block="MiniMaxM2SparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_local_experts"),
            ("top_k", "num_experts_per_tok"), ("jitter_eps", "router_jitter_noise")),
    fixed=(*SIGMOID_BIAS, ("normalize_topk_eps", 0.0)),  # divides by the plain sum
    weights=(ROUTER, WeightMap("router.selection_bias", "e_score_correction_bias"), *SWIGLU_EXPERTS),
    archetype="sigmoid top-k with a selection bias, renormalised; SwiGLU experts",
)

AFMOE = BlockSpec(
    name="afmoe", block="AfmoeSparseMoeBlock",
    config=_shared_experts_config("route_scale"),
    fixed=SIGMOID_BIAS,
    # expert_bias is a parameter without gradient in HF: our selection bias buffer
    weights=(WeightMap("router.weight", "router.gate.weight"), WeightMap("router.selection_bias", "expert_bias"),
             *SWIGLU_EXPERTS, *shared_mlp("shared_experts")),
    archetype="sigmoid top-k with a selection bias, renormalised, scaled; SwiGLU + shared experts",
    tiny=lambda sizes: dict(num_hidden_layers=sizes.layers + 1, num_dense_layers=1, num_shared_experts=2,
                            route_scale=2.0),
)

HY_V3 = BlockSpec(
    name="hy_v3", block="HYV3MoE",
    config=_shared_experts_config("router_scaling_factor"),
    fixed=SIGMOID_BIAS,
    requires=(("hidden_act", ("silu",)), ("mlp_bias", (False,))),
    weights=(ROUTER, WeightMap("router.selection_bias", "e_score_correction_bias"), *SWIGLU_EXPERTS,
             *shared_mlp("shared_experts")),
    archetype="sigmoid top-k with a selection bias, renormalised, scaled; SwiGLU + shared experts",
    tiny=lambda sizes: dict(num_hidden_layers=sizes.layers + 1, num_shared_experts=2, router_scaling_factor=2.0),
)

LAGUNA = BlockSpec(
    name="laguna", block="LagunaSparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "moe_intermediate_size"), ("num_experts", "num_experts"),
            ("top_k", "num_experts_per_tok"), ("routed_scaling_factor", "moe_routed_scaling_factor"),
            ("router_logit_softcap", "moe_router_logit_softcapping"),
            ("d_ff_shared", "shared_expert_intermediate_size")),
    # the scale multiplies the routed experts' sum in HF, the same as their weights
    fixed=(*SIGMOID_BIAS, ("normalize_topk_eps", 0.0), ("num_shared_experts", 1)),
    requires=(("hidden_act", ("silu",)), ("moe_apply_router_weight_on_input", (False,))),
    # gate.e_score_correction_bias is a parameter without gradient in HF: our selection bias buffer
    weights=(ROUTER, WeightMap("router.selection_bias", "gate.e_score_correction_bias"), *SWIGLU_EXPERTS,
             *shared_mlp("shared_experts")),
    archetype="sigmoid top-k of soft-capped logits with a selection bias, renormalised, scaled; SwiGLU + a shared "
              "expert",
    tiny=lambda sizes: dict(num_hidden_layers=sizes.layers + 1, num_attention_heads_per_layer=[sizes.heads] * (
        sizes.layers + 1), moe_router_logit_softcapping=3.0, moe_routed_scaling_factor=2.0),
)

SPECS: tuple[BlockSpec, ...] = (GLM4_MOE, GLM4_MOE_LITE, DOTS1, SOLAR_OPEN, EXAONE_MOE, MISTRAL4, MINIMAX_M2, AFMOE,
                                HY_V3, LAGUNA)
