"""OLMoE, FlexOlmo, Granite-MoE (and its shared variant), Ernie 4.5 MoE, Hunyuan-V1 MoE and Cohere 2
MoE: softmax top-k routers (Ernie's with a selection bias, Granite's and Cohere's over the top-k
logits) over SwiGLU experts, with or without shared experts."""

from __future__ import annotations

from typing import Any

from ..specs import ROUTER, SWIGLU_EXPERTS, TOPK_SWIGLU, BlockSpec, WeightMap, shared_mlp

OLMOE = BlockSpec(
    name="olmoe", block="OlmoeSparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_experts"),
            ("top_k", "num_experts_per_tok"), ("normalize_topk", "norm_topk_prob")),
    fixed=TOPK_SWIGLU,
    weights=(ROUTER, *SWIGLU_EXPERTS),
    archetype="softmax top-k (renormalised if norm_topk_prob); SwiGLU experts",
    tiny=lambda sizes: {"norm_topk_prob": True, "eos_token_id": 1},
)

FLEX_OLMO = BlockSpec(
    name="flex_olmo", block="FlexOlmoSparseMoeBlock", config=OLMOE.config, fixed=OLMOE.fixed, weights=OLMOE.weights,
    archetype=OLMOE.archetype, tiny=lambda sizes: {"norm_topk_prob": True, "pad_token_id": 0, "eos_token_id": 1},
)

# the router's weight is router.weight; the top-k is taken over the logits, the softmax over the kept ones
_GRANITE = dict(
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_local_experts"),
            ("top_k", "num_experts_per_tok")),
    fixed=(*TOPK_SWIGLU, ("gate_after_topk", True), ("topk_on_logits", True)),
    weights=(WeightMap("router.weight", "router.weight"), *SWIGLU_EXPERTS),
)

GRANITEMOE = BlockSpec(
    name="granitemoe", block="GraniteMoeMoE", **_GRANITE,
    archetype="top-k of the logits, softmax over the kept logits; SwiGLU experts",
)

# the shared MLP sits beside the block in the decoder layer (shared_mlp) and stays a transformers module
GRANITEMOESHARED = BlockSpec(
    name="granitemoeshared", block="GraniteMoeSharedMoE", **_GRANITE,
    archetype="top-k of the logits, softmax over the kept logits; SwiGLU experts (the shared MLP beside the "
              "block stays dense)",
    tiny=lambda sizes: {"shared_intermediate_size": sizes.d_ff},
)


def _ernie_shared(hf_config: Any) -> dict[str, Any]:
    """Ernie 4.5's shared experts: ``moe_num_shared_experts`` of width ``moe_intermediate_size`` (none
    when 0)."""
    count = hf_config.moe_num_shared_experts
    return {"num_shared_experts": count, "d_ff_shared": hf_config.moe_intermediate_size} if count else {}


ERNIE4_5_MOE = BlockSpec(
    name="ernie4_5_moe", block="Ernie4_5_MoeSparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "moe_intermediate_size"), ("num_experts", "moe_num_experts"),
            ("top_k", "moe_k"), ("normalize_topk_min", "moe_norm_min")),
    # the bias only picks experts; transformers never updates it (bias_update_rate 0)
    fixed=(*TOPK_SWIGLU, ("normalize_topk", True), ("selection_bias", True), ("bias_update_rate", 0.0)),
    requires=(("hidden_act", ("silu",)), ("use_bias", (False,))),
    derived=_ernie_shared,
    weights=(WeightMap("router.weight", "gate.weight"),
             WeightMap("router.selection_bias", "gate.moe_statics.e_score_correction_bias", "unsqueezed"),
             *SWIGLU_EXPERTS, *shared_mlp("shared_experts")),
    archetype="softmax top-k with a selection bias, renormalised (sum clamped at moe_norm_min); SwiGLU + shared "
              "experts",
    # a dense first layer, then two sparse ones
    tiny=lambda sizes: {"num_hidden_layers": sizes.layers + 1, "moe_layer_start_index": 1,
                        "moe_num_shared_experts": 2},
)


def _hunyuan_top_k(hf_config: Any) -> dict[str, Any]:
    """Hunyuan's ``moe_topk``: one number, or one per layer (converted when they are all equal).

    Raises:
        ValueError: per-layer values that differ (each block would need its own top-k).
    """
    top_k = hf_config.moe_topk
    if isinstance(top_k, int):
        return {"top_k": top_k}
    if len(set(top_k)) != 1:
        raise ValueError(f"HunYuanMoEV1Moe: config.moe_topk={list(top_k)} differs between layers, which the "
                         "conversion does not implement (one top_k for every block); use a model with one moe_topk")
    return {"top_k": top_k[0]}


HUNYUAN_V1_MOE = BlockSpec(
    name="hunyuan_v1_moe", block="HunYuanMoEV1Moe",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_experts"),
            ("d_ff_shared", "intermediate_size")),
    fixed=(*TOPK_SWIGLU, ("normalize_topk", True), ("num_shared_experts", 1)),
    requires=(("hidden_act", ("silu",)),),
    derived=_hunyuan_top_k,
    weights=(WeightMap("router.weight", "gate.wg.weight"), *SWIGLU_EXPERTS, *shared_mlp("shared_mlp")),
    archetype="softmax top-k, renormalised; SwiGLU experts + a shared MLP",
    tiny=lambda sizes: {"moe_topk": [sizes.top_k] * sizes.layers},
)


def _cohere2_routing(hf_config: Any) -> dict[str, Any]:
    """Cohere 2's ``expert_selection_fn`` (top-k of the logits, then a softmax over the kept ones, or
    their sigmoids, normalised if ``norm_topk_prob``) and its shared experts, combined by ``"sum"``
    or ``"average"`` (both halves times 0.5: exact, a power of two)."""
    fields: dict[str, Any] = {"topk_on_logits": True}
    if hf_config.expert_selection_fn == "softmax":
        fields["gate_after_topk"] = True
    else:
        fields.update(scoring_func="sigmoid", normalize_topk=hf_config.norm_topk_prob)
    if hf_config.num_shared_experts:
        fields.update(num_shared_experts=hf_config.num_shared_experts, d_ff_shared=hf_config.intermediate_size)
        if hf_config.shared_expert_combination_strategy == "average":
            fields.update(shared_expert_scale=0.5, routed_scaling_factor=0.5)
    return fields


COHERE2_MOE = BlockSpec(
    name="cohere2_moe", block="Cohere2MoeSparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_experts"),
            ("top_k", "num_experts_per_tok")),
    fixed=TOPK_SWIGLU,
    requires=(("hidden_act", ("silu",)), ("expert_selection_fn", ("softmax", "sigmoid")),
              ("shared_expert_combination_strategy", ("sum", "average"))),
    derived=_cohere2_routing,
    weights=(ROUTER, *SWIGLU_EXPERTS, *shared_mlp("shared_experts")),
    archetype="top-k of the logits, softmax over the kept logits (or their sigmoids); SwiGLU experts + shared "
              "experts (summed or averaged)",
    tiny=lambda sizes: {"num_shared_experts": 1, "shared_expert_combination_strategy": "average", "eos_token_id": 1},
)

SPECS: tuple[BlockSpec, ...] = (OLMOE, FLEX_OLMO, GRANITEMOE, GRANITEMOESHARED, ERNIE4_5_MOE, HUNYUAN_V1_MOE,
                                COHERE2_MOE)
