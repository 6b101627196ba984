"""GPT-OSS, DBRX, Aria (text model) and Llama 4 (text model): the expert variants. Their experts
hold ``x @ w`` matrices (``[E, D, 2F]``, Aria's and Llama 4's gate and up side by side, GPT-OSS's
interleaved with biases) or flat ``[E * F, D]`` rows (DBRX); GPT-OSS's SwiGLU is clamped, DBRX
divides the kept weights by their p-norm, and Llama 4's sigmoid score scales the expert's input."""

from __future__ import annotations

from typing import Any

from ..specs import BlockSpec, WeightMap, config_value, shared_mlp

# x @ w experts: gate and up side by side in gate_up_proj [E, D, 2F], down_proj [E, F, D]
MATMUL_SWIGLU = (
    WeightMap("experts.w1", "experts.gate_up_proj", "matmul", (0, 2)),
    WeightMap("experts.w3", "experts.gate_up_proj", "matmul", (1, 2)),
    WeightMap("experts.w2", "experts.down_proj", "matmul"),
)


def _dbrx_router(hf_config: Any) -> dict[str, Any]:
    """DBRX's ``moe_normalize_expert_weights`` (the p of the kept weights' norm; ``None``: the
    softmax probabilities as they are) and its input jitter (``None``: none)."""
    p = config_value(hf_config, "ffn_config.moe_normalize_expert_weights")
    jitter = config_value(hf_config, "ffn_config.moe_jitter_eps")
    return {"normalize_topk": p is not None, "normalize_topk_p": 1.0 if p is None else float(p),
            "jitter_eps": float(jitter or 0.0)}


GPT_OSS = BlockSpec(
    name="gpt_oss", block="GptOssMLP",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_local_experts"),
            ("top_k", "num_experts_per_tok"), ("swiglu_alpha", "swiglu_alpha"), ("swiglu_limit", "swiglu_limit")),
    # softmax over the top-k biased logits; biases on every expert projection
    fixed=(("router", "topk"), ("gate_after_topk", True), ("router_bias", True), ("expert", "clamped_swiglu"),
           ("expert_bias", True), ("expert_up_bias", True)),
    requires=(),
    weights=(WeightMap("router.weight", "router.weight"), WeightMap("router.bias", "router.bias"),
             WeightMap("experts.w1", "experts.gate_up_proj", "matmul_interleaved", (0, 2)),
             WeightMap("experts.w3", "experts.gate_up_proj", "matmul_interleaved", (1, 2)),
             WeightMap("experts.b1", "experts.gate_up_proj_bias", "matmul_interleaved", (0, 2)),
             WeightMap("experts.b3", "experts.gate_up_proj_bias", "matmul_interleaved", (1, 2)),
             WeightMap("experts.w2", "experts.down_proj", "matmul"),
             WeightMap("experts.b2", "experts.down_proj_bias", "matmul")),
    archetype="softmax over the top-k biased logits; clamped SwiGLU experts (alpha, limit) with biases",
    # a limit the tiny model's activations cross, and another slope
    tiny=lambda sizes: {"swiglu_limit": 0.5, "swiglu_alpha": 1.5},
    returns_logits=True,
)

DBRX = BlockSpec(
    name="dbrx", block="DbrxFFN",
    config=(("d_model", "d_model"), ("d_ff", "ffn_config.ffn_hidden_size"),
            ("num_experts", "ffn_config.moe_num_experts"), ("top_k", "ffn_config.moe_top_k")),
    fixed=(("router", "topk"), ("expert", "swiglu")),
    requires=(("ffn_config.ffn_act_fn", ({"name": "silu"},)),),
    derived=_dbrx_router,
    weights=(WeightMap("router.weight", "router.layer.weight"),
             WeightMap("experts.w1", "experts.mlp.w1", "linear_out"),
             WeightMap("experts.w3", "experts.mlp.v1", "linear_out"),
             WeightMap("experts.w2", "experts.mlp.w2", "matmul_rows")),
    archetype="softmax top-k, divided by the p-norm (moe_normalize_expert_weights); SwiGLU experts (flat rows)",
    # DBRX's attention reads rope_theta from its sub-config and clamps q, k, v (clip_qkv)
    tiny=lambda sizes: {"attn_config": {"kv_n_heads": sizes.kv_heads, "rope_theta": 10000.0, "clip_qkv": 8.0},
                        "ffn_config": {"moe_normalize_expert_weights": 2.0}},
)

ARIA = BlockSpec(
    name="aria", block="AriaTextMoELayer", config_type="aria_text",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "moe_num_experts"),
            ("top_k", "moe_topk"), ("num_shared_experts", "moe_num_shared_experts"),
            ("d_ff_shared", "intermediate_size")),
    fixed=(("router", "topk"), ("gate_after_topk", True), ("expert", "swiglu")),
    # the routed experts are always SiLU-gated, the shared ones follow hidden_act
    requires=(("hidden_act", ("silu",)), ("mlp_bias", (False,))),
    weights=(WeightMap("router.weight", "router.weight"), *MATMUL_SWIGLU, *shared_mlp("shared_experts")),
    archetype="softmax over the top-k logits; SwiGLU experts (x @ w) + shared experts",
)

LLAMA4 = BlockSpec(
    name="llama4", block="Llama4TextMoe", config_type="llama4_text",
    config=(("d_model", "hidden_size"), ("d_ff", "intermediate_size"), ("num_experts", "num_local_experts"),
            ("top_k", "num_experts_per_tok"), ("d_ff_shared", "intermediate_size")),
    # sigmoid of the top-k logits, which scales each expert's input; one shared expert
    fixed=(("router", "topk"), ("scoring_func", "sigmoid"), ("scale_expert_input", True), ("expert", "swiglu"),
           ("num_shared_experts", 1)),
    weights=(WeightMap("router.weight", "router.weight"), *MATMUL_SWIGLU, *shared_mlp("shared_expert")),
    archetype="sigmoid top-k scaling the expert's input; SwiGLU experts (x @ w) + a shared expert",
    # a dense layer between the two sparse ones (the 128-expert model interleaves them)
    tiny=lambda sizes: {"num_hidden_layers": sizes.layers + 1, "moe_layers": [0, sizes.layers],
                        "intermediate_size_mlp": sizes.d_ff},
    returns_logits=True,
)

SPECS: tuple[BlockSpec, ...] = (GPT_OSS, DBRX, ARIA, LLAMA4)
