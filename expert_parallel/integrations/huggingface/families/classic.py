"""Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3: softmax or sigmoid top-k routers
(DeepSeek's group-limited) over SwiGLU experts, with or without shared experts."""

from __future__ import annotations

from typing import Any

from ..specs import ROUTER, SHARED_GATE, SWIGLU_EXPERTS, TOPK_SWIGLU, BlockSpec, TinySizes, WeightMap, shared_mlp


def _mla(sizes: TinySizes) -> dict[str, Any]:
    """DeepSeek's tiny model: MLA attention with ranks ``d_model / 2``, a dense first layer, one
    more layer so two blocks are sparse, two shared experts, group-limited routing (4 groups, 2 kept)."""
    head_dim = sizes.d_model // sizes.heads
    return dict(num_hidden_layers=sizes.layers + 1, first_k_dense_replace=1, num_key_value_heads=sizes.heads,
                q_lora_rank=sizes.d_model // 2, kv_lora_rank=sizes.d_model // 2, qk_nope_head_dim=head_dim,
                qk_rope_head_dim=head_dim, v_head_dim=head_dim, n_shared_experts=2,
                n_group=4 if sizes.experts % 4 == 0 else 1, topk_group=2 if sizes.experts % 4 == 0 else 1)


def _deepseek_v2_groups(hf_config: Any) -> dict[str, Any]:
    """DeepSeek-V2's ``topk_method``: group-limited greedy (groups scored by their best expert)."""
    if hf_config.topk_method == "group_limited_greedy":
        return {"n_group": hf_config.n_group, "topk_group": hf_config.topk_group, "group_score": "max"}
    return {}


MIXTRAL = BlockSpec(
    name="mixtral", block="MixtralSparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_local_experts"),
            ("top_k", "num_experts_per_tok"), ("jitter_eps", "router_jitter_noise")),
    fixed=(*TOPK_SWIGLU, ("gate_after_topk", True)),
    weights=(ROUTER, *SWIGLU_EXPERTS),
    archetype="softmax top-k, renormalised; SwiGLU experts",
)

QWEN3_MOE = BlockSpec(
    name="qwen3_moe", block="Qwen3MoeSparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "moe_intermediate_size"), ("num_experts", "num_experts"),
            ("top_k", "num_experts_per_tok"), ("normalize_topk", "norm_topk_prob")),
    fixed=TOPK_SWIGLU,
    weights=(ROUTER, *SWIGLU_EXPERTS),
    archetype="softmax top-k (renormalised if norm_topk_prob); SwiGLU experts",
    tiny=lambda sizes: {"norm_topk_prob": True},
)

QWEN2_MOE = BlockSpec(
    name="qwen2_moe", block="Qwen2MoeSparseMoeBlock",
    config=(*QWEN3_MOE.config, ("d_ff_shared", "shared_expert_intermediate_size")),
    fixed=(*TOPK_SWIGLU, ("num_shared_experts", 1), ("shared_expert_gate", True)),
    weights=(ROUTER, *SWIGLU_EXPERTS, *shared_mlp("shared_expert"),
             WeightMap(SHARED_GATE, "shared_expert_gate.weight")),
    archetype="softmax top-k; SwiGLU experts + a sigmoid-gated shared expert",
    tiny=lambda sizes: {"norm_topk_prob": False},
)

DEEPSEEK_V2 = BlockSpec(
    name="deepseek_v2", block="DeepseekV2Moe",
    config=(("d_model", "hidden_size"), ("d_ff", "moe_intermediate_size"), ("num_experts", "n_routed_experts"),
            ("top_k", "num_experts_per_tok"), ("routed_scaling_factor", "routed_scaling_factor"),
            ("num_shared_experts", "n_shared_experts"), ("d_ff_shared", "moe_intermediate_size")),
    fixed=(*TOPK_SWIGLU, ("scoring_func", "softmax")),  # V2's router never normalises the kept scores
    requires=(("hidden_act", ("silu",)), ("topk_method", ("greedy", "group_limited_greedy"))),
    derived=_deepseek_v2_groups,
    weights=(ROUTER, *SWIGLU_EXPERTS, *shared_mlp("shared_experts")),
    archetype="softmax top-k, group-limited greedy, scaled; SwiGLU experts + shared experts",
    tiny=lambda sizes: {**_mla(sizes), "topk_method": "group_limited_greedy", "routed_scaling_factor": 2.0},
)

DEEPSEEK_V3 = BlockSpec(
    name="deepseek_v3", block="DeepseekV3MoE",
    config=(("d_model", "hidden_size"), ("d_ff", "moe_intermediate_size"), ("num_experts", "n_routed_experts"),
            ("top_k", "num_experts_per_tok"), ("normalize_topk", "norm_topk_prob"),
            ("routed_scaling_factor", "routed_scaling_factor"), ("n_group", "n_group"), ("topk_group", "topk_group"),
            ("num_shared_experts", "n_shared_experts"), ("d_ff_shared", "moe_intermediate_size")),
    # the bias only picks experts; Hugging Face's model never updates it (aux-loss-free balancing off)
    fixed=(*TOPK_SWIGLU, ("scoring_func", "sigmoid"), ("group_score", "top2_sum"), ("selection_bias", True),
           ("bias_update_rate", 0.0)),
    weights=(ROUTER, WeightMap("router.selection_bias", "gate.e_score_correction_bias"), *SWIGLU_EXPERTS,
             *shared_mlp("shared_experts")),
    archetype="sigmoid top-k with a selection bias, group-limited (top-2 sum), scaled; SwiGLU + shared experts",
    tiny=lambda sizes: {**_mla(sizes), "norm_topk_prob": True, "routed_scaling_factor": 2.5},
)

SPECS: tuple[BlockSpec, ...] = (MIXTRAL, QWEN3_MOE, QWEN2_MOE, DEEPSEEK_V2, DEEPSEEK_V3)
