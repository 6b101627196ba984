"""DeepSeek-V2/V3 and Qwen2-MoE router features of ``topk``: sigmoid scores, group-limited selection,
the routed scaling factor, the selection bias, the router's linear bias and the gated shared expert.

Each is checked against a plain per-token Python reference written here (floats, never the
library's routing code) and against Hugging Face transformers' own modules (``DeepseekV3TopkRouter``,
``DeepseekV2TopkRouter``, ``DeepseekV3MoE``, ``Qwen2MoeSparseMoeBlock``) with copied weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.routing import Router, route
from tests.unit.reference import expert_forward

S, D, E = 40, 8, 16

CASES = {
    # DeepSeek-V3: sigmoid, top-2-sum groups on the biased scores, normalised, scaled
    "v3": dict(scoring_func="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", normalize_topk=True,
               routed_scaling_factor=2.5, selection_bias=True),
    # DeepSeek-V2: softmax, max groups, scaled, not normalised
    "v2": dict(n_group=4, topk_group=2, group_score="max", routed_scaling_factor=1.5),
    "sigmoid-bias-no-groups": dict(scoring_func="sigmoid", bias_update_rate=0.01),
    "softmax-max-groups-bias-normalised": dict(n_group=8, topk_group=3, normalize_topk=True, selection_bias=True),
    # Ernie 4.5: softmax, a selection bias, normalised with the sum clamped at moe_norm_min
    "ernie": dict(selection_bias=True, normalize_topk=True, normalize_topk_min=1e-12),
    # Granite, Cohere 2 (softmax): top-k of the logits, softmax over the kept logits
    "granite": dict(topk_on_logits=True, gate_after_topk=True),
    # Cohere 2 (sigmoid): top-k of the logits, sigmoid scores, normalised
    "cohere-sigmoid": dict(topk_on_logits=True, scoring_func="sigmoid", normalize_topk=True),
}


def _scores(logits: list[float], scoring_func: str) -> list[float]:
    if scoring_func == "sigmoid":
        return [1.0 / (1.0 + math.exp(-v)) for v in logits]
    exps = [math.exp(v - max(logits)) for v in logits]
    return [v / sum(exps) for v in exps]


def reference_decision(logits: list[float], bias: list[float], cfg: MoEConfig) -> tuple[list[int], list[float]]:
    """One token, written from DeepSeek-V2/V3's, Ernie 4.5's and Granite's descriptions: scores;
    choose groups and experts by ``score + bias`` (or by the logits); weigh by the unbiased scores
    (or the softmax over the kept logits), normalise (the sum clamped at ``normalize_topk_min``),
    scale."""
    scores = _scores(logits, cfg.scoring_func)
    choice = list(logits) if cfg.topk_on_logits else [s + b for s, b in zip(scores, bias)]
    allowed = list(range(len(logits)))
    if cfg.n_group > 1:
        size = len(logits) // cfg.n_group
        groups = [allowed[g * size:(g + 1) * size] for g in range(cfg.n_group)]

        def group_score(members: list[int]) -> float:
            best = sorted((choice[e] for e in members), reverse=True)
            return best[0] if cfg.group_score == "max" else best[0] + best[1]

        kept = sorted(range(cfg.n_group), key=lambda g: -group_score(groups[g]))[:cfg.topk_group]
        allowed = [e for g in kept for e in groups[g]]
    experts = sorted(allowed, key=lambda e: -choice[e])[:cfg.num_choices]
    weights = [scores[e] for e in experts]
    if cfg.gate_after_topk:
        weights = _scores([logits[e] for e in experts], "softmax")
    elif cfg.normalize_topk:
        total = sum(weights) + 1e-20 if cfg.scoring_func == "sigmoid" else max(sum(weights), cfg.normalize_topk_min)
        weights = [w / total for w in weights]
    return experts, [w * cfg.routed_scaling_factor for w in weights]


def _layer(seed: int = 0, **options) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(d_model=D, d_ff=12, num_experts=E, router="topk", top_k=4, dropless=True,
                               aux_loss_weight=1.0, **options))
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
        if layer.router.selection_bias is not None:
            layer.router.selection_bias.normal_(0.0, 0.3)
        if layer.router.bias is not None:
            layer.router.bias.normal_()
    return layer


@pytest.mark.parametrize("case", sorted(CASES))
def test_topk_with_scores_groups_scaling_and_bias_matches_per_token_reference(case):
    layer = _layer(**CASES[case])
    cfg, router = layer.cfg, layer.router
    x = torch.randn(S, D, generator=torch.Generator().manual_seed(1))
    bias = router.selection_bias.tolist() if router.selection_bias is not None else [0.0] * E
    rows = [(router.weight @ x[s]).tolist() for s in range(S)]
    decisions = [reference_decision(row, bias, cfg) for row in rows]
    if router.selection_bias is not None:  # the bias must matter, or the test could not see it
        assert any(reference_decision(row, [0.0] * E, cfg)[0] != d[0] for row, d in zip(rows, decisions))

    out = layer(x)
    y = torch.stack([sum(w * expert_forward(layer, e, x[s]) for e, w in zip(*decisions[s])) for s in range(S)])
    assert_close(out.output, y, rtol=1e-5, atol=1e-5)
    routing = route(router(x)[0], cfg, selection_bias_E=router.selection_bias)
    assert routing.expert_SK.tolist() == [d[0] for d in decisions]
    assert_close(routing.weight_SK, torch.tensor([d[1] for d in decisions]), rtol=1e-6, atol=1e-7)
    # load balance: P the softmax, or the sigmoid scores normalised per token; f over all S * k choices
    counts = [sum(e in d[0] for d in decisions) for e in range(E)]
    probs = [_scores(row, cfg.scoring_func) for row in rows]
    probs = [[p / sum(row) for p in row] for row in probs]
    aux = sum(E * counts[e] / (S * cfg.num_choices) * sum(p[e] for p in probs) / S for e in range(E))
    assert_close(out.aux_loss.item(), aux, rtol=1e-5, atol=1e-7)
    assert out.stats.tokens_per_expert.tolist() == counts


def test_router_bias_is_added_to_the_logits_in_fp32_and_trained():
    torch.manual_seed(0)
    router = Router(D, E, bias=True)
    with torch.no_grad():
        router.bias.normal_()
    x = torch.randn(5, D)
    want = torch.stack([router.weight @ x[s] + router.bias for s in range(5)])
    logits, _ = router(x)
    assert_close(logits, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router(x.bfloat16())[0].dtype == torch.float32
    logits.sum().backward()
    assert_close(router.bias.grad, torch.full((E,), 5.0))
    assert "bias" in dict(router.named_parameters())


def test_selection_bias_is_an_fp32_buffer_kept_fp32_by_casts_and_saved_without_its_counts():
    layer = _layer(bias_update_rate=0.01)
    router = layer.router
    names = dict(router.named_parameters())
    assert "selection_bias" not in names and "selection_bias" in dict(router.named_buffers())
    with torch.no_grad():
        router.selection_bias.fill_(0.1 + 1e-3)  # not representable in bf16
    kept = router.selection_bias.clone()
    layer.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16 and router.selection_bias.dtype == torch.float32
    assert torch.equal(router.selection_bias, kept)
    state = layer.state_dict()
    assert "router.selection_bias" in state and "router.selection_load" not in state


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers' own modules
# ----------------------------------------------------------------------------------------------

def _fill(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """HF modules start from empty / zero tensors: draw every parameter and buffer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)


def _same_choices(ours, hf_indices, hf_weights) -> None:
    """Equal chosen experts per token (as sets: HF picks with ``sorted=False``) and equal weights."""
    order = ours.expert_SK.sort(dim=-1)
    hf_order = hf_indices.sort(dim=-1)
    assert torch.equal(order.values, hf_order.values)
    assert_close(ours.weight_SK.gather(-1, order.indices), hf_weights.gather(-1, hf_order.indices),
                 rtol=1e-6, atol=0.0)


def _deepseek_v3_config(norm: bool, n_group: int = 4, topk_group: int = 2):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(hidden_size=D, moe_intermediate_size=6, n_routed_experts=E, num_experts_per_tok=4,
                            n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5,
                            n_shared_experts=2, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu")


def _v3_options(hf_cfg) -> dict:
    return dict(router="topk", top_k=hf_cfg.num_experts_per_tok, scoring_func="sigmoid", n_group=hf_cfg.n_group,
                topk_group=hf_cfg.topk_group, group_score="top2_sum", normalize_topk=hf_cfg.norm_topk_prob,
                routed_scaling_factor=hf_cfg.routed_scaling_factor, selection_bias=True)


@pytest.mark.parametrize(("norm", "n_group", "topk_group"), [(True, 4, 2), (False, 4, 2), (True, 1, 1),
                                                             (True, 8, 3)])
def test_sigmoid_top2_sum_groups_equal_transformers_deepseek_v3_router(norm, n_group, topk_group):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = _deepseek_v3_config(norm, n_group, topk_group)
    hf = DeepseekV3TopkRouter(hf_cfg)
    _fill(hf, seed=3)
    with torch.no_grad():
        hf.e_score_correction_bias.mul_(0.4)
    cfg = MoEConfig(d_model=D, d_ff=6, num_experts=E, **_v3_options(hf_cfg))
    router = Router.from_config(cfg)
    router.load_state_dict({"weight": hf.weight, "selection_bias": hf.e_score_correction_bias})
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4))
    hf_logits, hf_weights, hf_indices = hf(x)
    logits, _ = router(x)
    assert_close(logits, hf_logits, rtol=1e-6, atol=1e-6)
    ours = route(logits, cfg, selection_bias_E=router.selection_bias)
    _same_choices(ours, hf_indices, hf_weights)
    unbiased = route(logits, cfg)
    assert not torch.equal(unbiased.expert_SK.sort(-1).values, hf_indices.sort(-1).values)  # the bias matters


@pytest.mark.parametrize(("method", "n_group", "topk_group", "scale"), [
    ("group_limited_greedy", 4, 2, 1.5), ("group_limited_greedy", 8, 3, 1.0), ("greedy", 1, 1, 16.0)])
def test_softmax_max_groups_equal_transformers_deepseek_v2_router(method, n_group, topk_group, scale):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    hf_cfg = DeepseekV2Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=4, topk_method=method,
                              n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale,
                              num_attention_heads=2)
    hf = DeepseekV2TopkRouter(hf_cfg)
    _fill(hf, seed=5, scale=1.0)
    # Hugging Face's DeepSeek-V2 router never normalises (it ignores norm_topk_prob)
    cfg = MoEConfig(d_model=D, d_ff=6, num_experts=E, router="topk", top_k=4, n_group=n_group,
                    topk_group=topk_group, group_score="max", routed_scaling_factor=scale)
    router = Router.from_config(cfg)
    router.load_state_dict({"weight": hf.weight})
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(6))
    hf_logits, hf_weights, hf_indices = hf(x)
    _same_choices(route(router(x)[0], cfg), hf_indices, hf_weights)


def _copy_hf_experts(layer: MoELayer, gate_up_EHD: torch.Tensor, down_EDF: torch.Tensor) -> None:
    """Transformers 5 stacks experts: ``gate_up_proj [E, 2F, D]`` (gate rows, then up rows),
    ``down_proj [E, D, F]``; ours are ``w1, w3 [E, D, F]``, ``w2 [E, F, D]``."""
    d_ff = layer.cfg.d_ff
    with torch.no_grad():
        layer.experts.w1.copy_(gate_up_EHD[:, :d_ff].transpose(1, 2))
        layer.experts.w3.copy_(gate_up_EHD[:, d_ff:].transpose(1, 2))
        layer.experts.w2.copy_(down_EDF.transpose(1, 2))


def _copy_hf_mlp(layer: MoELayer, mlp: torch.nn.Module) -> None:
    """A gate/up/down SwiGLU MLP into our single shared expert."""
    shared = layer.shared_experts
    with torch.no_grad():
        shared.w1[0].copy_(mlp.gate_proj.weight.t())
        shared.w3[0].copy_(mlp.up_proj.weight.t())
        shared.w2[0].copy_(mlp.down_proj.weight.t())


def test_layer_equals_transformers_deepseek_v3_moe_block():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = _deepseek_v3_config(norm=True)
    hf = DeepseekV3MoE(hf_cfg)
    _fill(hf, seed=7)
    # DeepSeek's n_shared_experts are one MLP of width n_shared * moe_intermediate_size
    cfg = MoEConfig(d_model=D, d_ff=hf_cfg.moe_intermediate_size, num_experts=E, expert="swiglu", dropless=True,
                    num_shared_experts=1, d_ff_shared=hf_cfg.moe_intermediate_size * hf_cfg.n_shared_experts,
                    **_v3_options(hf_cfg))
    layer = MoELayer(cfg).eval()
    layer.router.load_state_dict({"weight": hf.gate.weight, "selection_bias": hf.gate.e_score_correction_bias})
    _copy_hf_experts(layer, hf.experts.gate_up_proj, hf.experts.down_proj)
    _copy_hf_mlp(layer, hf.shared_experts)
    x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert_close(layer(x).output, hf(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [False, True])
def test_gated_shared_expert_layer_equals_transformers_qwen2_moe_block(norm):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=6, shared_expert_intermediate_size=10,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm, hidden_act="silu",
                            num_attention_heads=2, num_key_value_heads=2)
    hf = Qwen2MoeSparseMoeBlock(hf_cfg)
    _fill(hf, seed=9)
    cfg = MoEConfig(d_model=D, d_ff=6, num_experts=8, router="topk", top_k=2, normalize_topk=norm, expert="swiglu",
                    num_shared_experts=1, d_ff_shared=10, shared_expert_gate=True, dropless=True)
    layer = MoELayer(cfg).eval()
    layer.router.load_state_dict({"weight": hf.gate.weight})
    _copy_hf_experts(layer, hf.experts.gate_up_proj, hf.experts.down_proj)
    _copy_hf_mlp(layer, hf.shared_expert)
    layer.shared_gate.load_state_dict(hf.shared_expert_gate.state_dict())
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert_close(layer(x).output, hf(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

BASE = dict(d_model=8, d_ff=16, num_experts=8, router="topk", top_k=2)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (dict(scoring_func="tanh"), r"MoEConfig.scoring_func='tanh' .*choose one of \['softmax', 'sigmoid'\]"),
    (dict(group_score="sum"), r"MoEConfig.group_score='sum' .*choose one of \['max', 'top2_sum'\]"),
    (dict(n_group=3), r"MoEConfig.n_group=3 .*does not divide num_experts=8"),
    (dict(n_group=0), r"MoEConfig.n_group=0 .*integer >= 1"),
    (dict(n_group=4, topk_group=5), r"MoEConfig.topk_group=5 .*\[1, n_group=4\]"),
    (dict(topk_group=2), r"MoEConfig.topk_group=2 .*\[1, n_group=1\]"),
    (dict(n_group=4, topk_group=0), r"MoEConfig.topk_group=0 .*integer >= 1"),
    (dict(n_group=4, topk_group=1, top_k=3), r"MoEConfig.top_k=3 .*topk_group=1 group\(s\) of .* 2 experts"),
    (dict(n_group=8, topk_group=4, group_score="top2_sum"), r"group_score='top2_sum' .*one expert per group"),
    (dict(scoring_func="sigmoid", gate_after_topk=True), r"gate_after_topk=True .*scoring_func='sigmoid'"),
    (dict(routed_scaling_factor=0.0), r"MoEConfig.routed_scaling_factor=0.0 .*> 0"),
    (dict(routed_scaling_factor=float("inf")), r"routed_scaling_factor=inf .*finite number"),
    (dict(bias_update_rate=-1e-3), r"MoEConfig.bias_update_rate=-0.001 .*>= 0"),
    (dict(selection_bias=1), r"MoEConfig.selection_bias=1 .*True or False"),
    (dict(shared_expert_gate=True), r"MoEConfig.shared_expert_gate=True .*num_shared_experts=0"),
    (dict(router="gshard", top_k=2, scoring_func="sigmoid"), r"scoring_func='sigmoid' .*router='topk' only"),
    (dict(router="switch", top_k=1, routed_scaling_factor=2.0), r"routed_scaling_factor=2.0 .*router='topk' only"),
    (dict(router="noisy_topk", n_group=2, topk_group=1), r"n_group=2 .*router='topk' only"),
    (dict(router="gshard", top_k=2, bias_update_rate=1e-3), r"bias_update_rate=0.001 .*router='topk' only"),
    (dict(topk_on_logits=True, selection_bias=True), r"topk_on_logits=True .*choose by the \(biased\) scores"),
    (dict(topk_on_logits=True, n_group=2, topk_group=1), r"topk_on_logits=True .*group-limited routing"),
    (dict(normalize_topk_min=1e-12), r"normalize_topk_min=1e-12 .*set normalize_topk=True"),
    (dict(normalize_topk_min=1e-12, normalize_topk=True, scoring_func="sigmoid"), r"normalize_topk_min=1e-12 .*"
                                                                                  r"scoring_func='softmax'"),
    (dict(normalize_topk_min=-1.0, normalize_topk=True), r"normalize_topk_min=-1.0 .*>= 0"),
    (dict(router="gshard", top_k=2, topk_on_logits=True), r"topk_on_logits=True .*router='topk' only"),
    (dict(shared_expert_scale=0.5), r"MoEConfig.shared_expert_scale=0.5 .*num_shared_experts=0"),
    (dict(shared_expert_scale=0.0, num_shared_experts=1), r"MoEConfig.shared_expert_scale=0.0 .*> 0"),
])
def test_bad_router_feature_options_raise_value_error_naming_the_field(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(("scoring_func", "gate_after_topk"), [("softmax", True), ("sigmoid", False)])
def test_topk_on_logits_orders_experts_whose_scores_round_to_a_tie(scoring_func, gate_after_topk):
    """The softmax underflows to 0 (a logit 300 above the rest) or the sigmoid saturates to 1
    (logits >= 20): the scores tie, the logits still order the experts (Granite, Cohere 2)."""
    row = [1.0, 2.0, 300.0, 5.0, 3.0, 4.0, 0.0, 6.0] if scoring_func == "softmax" else \
        [20.0, 21.0, 40.0, 35.0, 22.0, 30.0, 0.0, 25.0]
    cfg = MoEConfig(**{**BASE, "top_k": 3, "scoring_func": scoring_func, "gate_after_topk": gate_after_topk,
                       "topk_on_logits": True})
    experts, weights = reference_decision(row, [0.0] * 8, cfg)
    assert experts == ([2, 7, 3] if scoring_func == "softmax" else [2, 3, 5])
    routing = route(torch.tensor([row]), cfg)
    assert routing.expert_SK.tolist() == [experts]
    assert_close(routing.weight_SK, torch.tensor([weights]))


def test_normalize_topk_min_bounds_the_sum_of_underflowing_kept_scores():
    """Ernie 4.5: the bias picks two experts whose probabilities (~e^-60) sum below moe_norm_min,
    so they are divided by moe_norm_min, not inflated to 1/2 each."""
    row, bias = [60.0] + [0.0] * 7, [0.0, 2.0, 2.0] + [0.0] * 5
    cfg = MoEConfig(**{**BASE, "top_k": 2, "selection_bias": True, "normalize_topk": True,
                       "normalize_topk_min": 1e-12})
    experts, weights = reference_decision(row, bias, cfg)
    assert sorted(experts) == [1, 2] and max(weights) < 1e-10
    routing = route(torch.tensor([row]), cfg, selection_bias_E=torch.tensor(bias))
    assert sorted(routing.expert_SK[0].tolist()) == [1, 2]
    assert_close(routing.weight_SK, torch.tensor([weights]), rtol=1e-5, atol=0.0)


def test_router_bias_and_the_shared_gate_work_with_any_router():
    for router in ("gshard", "switch", "noisy_topk", "soft", "expert_choice"):
        cfg = MoEConfig(d_model=8, d_ff=16, num_experts=8, router=router, router_bias=True, num_shared_experts=1,
                        shared_expert_gate=True)
        layer = MoELayer(cfg)
        assert layer.router.bias.shape == (8,) and layer.shared_gate.weight.shape == (1, 8)
        assert torch.isfinite(layer(torch.randn(6, 8)).output).all()
    assert MoEConfig(**BASE, bias_update_rate=0.1).has_selection_bias
    assert not MoEConfig(**BASE).has_selection_bias
