"""Hybrid models: sparse-MoE blocks beside Mamba (Jamba), gated DeltaNet (Qwen3-Next, Qwen3.5-MoE),
short-convolution (LFM2-MoE) or lightning-attention (MiniMax) layers, which stay as they are, as
do their dense MLPs (Jamba's ``expert_layer_period``, Qwen3-Next's ``mlp_only_layers``,
LFM2-MoE's ``num_dense_layers``)."""

from __future__ import annotations

from typing import Any

from ..specs import ROUTER, SWIGLU_EXPERTS, TOPK_SWIGLU, BlockSpec, TinySizes, WeightMap
from .classic import MIXTRAL, QWEN2_MOE


def _alternating(layers: int, first: str, second: str) -> list[str]:
    """``layers`` layer types, ``first`` and ``second`` in turn (a tiny model keeps both kinds)."""
    return [first if index % 2 == 0 else second for index in range(layers)]


def _gated_deltanet(sizes: TinySizes, dense_first: bool = False) -> dict[str, Any]:
    """Qwen3-Next's and Qwen3.5's tiny models: gated DeltaNet and attention layers in turn, small
    linear-attention heads; ``dense_first``: one more layer, first, with a dense MLP
    (``mlp_only_layers``)."""
    head_dim, layers = sizes.d_model // sizes.heads, sizes.layers + dense_first
    dense = {"num_hidden_layers": layers, "mlp_only_layers": [0]} if dense_first else {}
    return dict(**dense, layer_types=_alternating(layers, "linear_attention", "full_attention"),
                linear_key_head_dim=head_dim, linear_value_head_dim=head_dim, linear_num_key_heads=sizes.kv_heads,
                linear_num_value_heads=sizes.heads, linear_conv_kernel_dim=2)


def _jamba(sizes: TinySizes) -> dict[str, Any]:
    """Jamba's tiny model: ``2 * layers`` layers, attention in layer 1 (Mamba elsewhere), experts
    in every odd layer (a dense MLP in the others)."""
    return dict(num_hidden_layers=2 * sizes.layers, attn_layer_period=2 * sizes.layers, attn_layer_offset=1,
                expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=2, mamba_expand=2,
                mamba_dt_rank=4)


JAMBA = BlockSpec(
    name="jamba", block="JambaSparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_experts"),
            ("top_k", "num_experts_per_tok")),
    fixed=TOPK_SWIGLU,  # the top-k softmax probabilities, not renormalised
    weights=(WeightMap("router.weight", "router.weight"), *SWIGLU_EXPERTS),
    archetype="softmax top-k, unnormalised; SwiGLU experts; beside Mamba layers and dense MLPs",
    tiny=_jamba,
)

QWEN3_NEXT = BlockSpec(
    name="qwen3_next", block="Qwen3NextSparseMoeBlock",
    config=QWEN2_MOE.config, fixed=QWEN2_MOE.fixed, weights=QWEN2_MOE.weights,
    archetype="softmax top-k (renormalised if norm_topk_prob); SwiGLU experts + a sigmoid-gated shared expert; "
              "beside gated DeltaNet layers",
    tiny=lambda sizes: {**_gated_deltanet(sizes, dense_first=True), "norm_topk_prob": True},
)

QWEN3_5_MOE = BlockSpec(
    name="qwen3_5_moe", block="Qwen3_5MoeSparseMoeBlock",
    config=tuple(pair for pair in QWEN2_MOE.config if pair[0] != "normalize_topk"),
    fixed=(*QWEN2_MOE.fixed, ("normalize_topk", True)),  # the router always renormalises
    weights=QWEN2_MOE.weights,
    archetype="softmax top-k, renormalised; SwiGLU experts + a sigmoid-gated shared expert; beside gated DeltaNet "
              "layers (the text model of Qwen3.5-MoE)",
    tiny=_gated_deltanet,
    config_type="qwen3_5_moe_text",
)

MINIMAX = BlockSpec(
    name="minimax", block="MiniMaxSparseMoeBlock",
    config=MIXTRAL.config, fixed=MIXTRAL.fixed, weights=MIXTRAL.weights,
    archetype="softmax top-k, renormalised; SwiGLU experts; beside lightning-attention layers",
    # lightning attention in blocks of 4 tokens (several per sequence), scaled residuals
    tiny=lambda sizes: {"layer_types": _alternating(sizes.layers, "linear_attention", "full_attention"),
                        "block_size": 4, "full_attn_alpha_factor": 0.5, "linear_attn_beta_factor": 1.5,
                        "mlp_alpha_factor": 1.25, "mlp_beta_factor": 0.75},
)

LFM2_MOE = BlockSpec(
    name="lfm2_moe", block="Lfm2MoeSparseMoeBlock",
    config=(("d_model", "hidden_size"), ("d_ff", "moe_intermediate_size"), ("num_experts", "num_experts"),
            ("top_k", "num_experts_per_tok"), ("normalize_topk", "norm_topk_prob"),
            ("routed_scaling_factor", "routed_scaling_factor")),
    # the expert bias only picks experts, and Hugging Face's model never updates it
    fixed=(*TOPK_SWIGLU, ("scoring_func", "sigmoid"), ("selection_bias", True), ("bias_update_rate", 0.0)),
    requires=(("use_expert_bias", (True,)),),  # its SwiGLU is F.silu whatever the config says
    derived=lambda hf_config: {"normalize_topk_eps": 1e-6} if hf_config.norm_topk_prob else {},
    weights=(ROUTER, WeightMap("router.selection_bias", "expert_bias"), *SWIGLU_EXPERTS),
    archetype="sigmoid top-k with a selection bias (the expert bias), renormalised (+1e-6), scaled; SwiGLU "
              "experts; beside short-convolution layers and dense first layers",
    # a dense first layer (num_dense_layers), then short convolutions and attention in turn
    tiny=lambda sizes: {"num_hidden_layers": sizes.layers + 1, "num_dense_layers": 1,
                        "layer_types": _alternating(sizes.layers + 1, "conv", "full_attention"),
                        "norm_topk_prob": True, "routed_scaling_factor": 2.0, "use_expert_bias": True},
)

SPECS: tuple[BlockSpec, ...] = (JAMBA, QWEN3_NEXT, QWEN3_5_MOE, MINIMAX, LFM2_MOE)
