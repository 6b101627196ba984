"""Sigmoid-router variants of ``topk`` for the Hugging Face families that have them: soft-capped
router logits (``router_logit_softcap``, Laguna) and the epsilon of normalising sigmoid scores
(``normalize_topk_eps``: MiniMax-M2 and Laguna divide by the plain sum, LFM2 adds 1e-6).

Checked against a plain per-token Python reference written here (floats, never the library's
routing code), and against transformers' own routers (``LagunaTopKRouter``, and Mistral 4's
softmax router with DeepSeek-V3's top-2-sum groups, ``Mistral4TopkRouter``) with copied weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.routing import Router, route
from expert_parallel.routing.replay import replayed
from tests.unit.reference import expert_forward

S, D, E, K = 32, 8, 8, 2


def reference_decision(logits: list[float], bias: list[float], cap: float, eps: float,
                       scale: float) -> tuple[list[int], list[float]]:
    """One token: cap the logits (``cap * tanh(l / cap)``), sigmoid, choose the k largest
    ``score + bias``, weigh by the unbiased scores over ``sum + eps``, scale."""
    capped = [cap * math.tanh(v / cap) for v in logits] if cap else logits
    scores = [1.0 / (1.0 + math.exp(-v)) for v in capped]
    experts = sorted(range(len(scores)), key=lambda e: -(scores[e] + bias[e]))[:K]
    total = sum(scores[e] for e in experts) + eps
    return experts, [scores[e] / total * scale for e in experts]


def _layer(**options) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=D, d_ff=6, num_experts=E, router="topk", top_k=K, expert="swiglu",
                               scoring_func="sigmoid", normalize_topk=True, selection_bias=True, dropless=True,
                               routed_scaling_factor=1.5, **options))
    with torch.no_grad():
        layer.router.weight.mul_(4.0)  # logits of several units: the cap bends them
        layer.router.selection_bias.normal_(0.0, 0.2)
    return layer


@pytest.mark.parametrize(("cap", "eps"), [(2.0, 0.0), (0.0, 0.5)])
def test_soft_capped_sigmoid_router_and_its_normalising_epsilon_match_per_token_reference(cap, eps):
    layer = _layer(router_logit_softcap=cap, normalize_topk_eps=eps)
    router = layer.router
    x = torch.randn(S, D, generator=torch.Generator().manual_seed(1))
    bias = router.selection_bias.tolist()
    rows = [(router.weight @ x[s]).tolist() for s in range(S)]
    decisions = [reference_decision(row, bias, cap, eps, 1.5) for row in rows]
    if cap:  # the cap must change some choice, or the test could not see it
        assert any(reference_decision(row, bias, 0.0, eps, 1.5)[0] != d[0] for row, d in zip(rows, decisions))
        want = torch.tensor([[cap * math.tanh(v / cap) for v in row] for row in rows])
        assert_close(router.logits(x), want, rtol=1e-6, atol=1e-6)
        assert_close(router(x)[0], want, rtol=1e-6, atol=1e-6)

    out = layer(x)
    y = torch.stack([sum(w * expert_forward(layer, e, x[s]) for e, w in zip(*decisions[s])) for s in range(S)])
    assert_close(out.output, y, rtol=1e-5, atol=1e-5)
    routing = route(router(x)[0], layer.cfg, selection_bias_E=router.selection_bias)
    assert routing.expert_SK.tolist() == [d[0] for d in decisions]
    assert_close(routing.weight_SK, torch.tensor([d[1] for d in decisions]), rtol=1e-6, atol=1e-7)
    # routing replay recomputes the weights with the same cap and epsilon
    again = replayed(routing, router(x)[0], routing.expert_SK, routing.active_SK, layer.cfg)
    assert torch.equal(again.weight_SK, routing.weight_SK)


def test_the_soft_cap_bounds_any_routers_logits_and_carries_gradients():
    torch.manual_seed(0)
    router = Router.from_config(MoEConfig(d_model=D, d_ff=6, num_experts=E, router="switch", router_bias=True,
                                          router_logit_softcap=1.5))
    with torch.no_grad():
        router.weight.mul_(10.0)
        router.bias.normal_()
    x = torch.randn(5, D)
    logits, _ = router(x)
    raw = x @ router.weight.t() + router.bias
    assert_close(logits, 1.5 * torch.tanh(raw / 1.5))
    assert logits.abs().max() < 1.5 < raw.abs().max()
    logits.sum().backward()
    assert router.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers' own routers
# ----------------------------------------------------------------------------------------------

def _same_choices(ours, hf_indices: torch.Tensor, hf_weights: torch.Tensor) -> None:
    """The same experts per token (as sets: HF may pick with ``sorted=False``), the same weights."""
    order, hf_order = ours.expert_SK.sort(dim=-1), hf_indices.sort(dim=-1)
    assert torch.equal(order.values, hf_order.values)
    assert_close(ours.weight_SK.gather(-1, order.indices), hf_weights.gather(-1, hf_order.indices),
                 rtol=1e-6, atol=0.0)


def test_capped_sigmoid_router_equals_transformers_laguna_router():
    from transformers import LagunaConfig
    from transformers.models.laguna.modeling_laguna import LagunaTopKRouter

    hf = LagunaTopKRouter(LagunaConfig(hidden_size=D, num_experts=E, num_experts_per_tok=K,
                                       moe_router_logit_softcapping=2.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, D, generator=gen) * 2.0)
        hf.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.2)
    cfg = MoEConfig(d_model=D, d_ff=6, num_experts=E, router="topk", top_k=K, scoring_func="sigmoid",
                    normalize_topk=True, normalize_topk_eps=0.0, selection_bias=True, router_logit_softcap=2.0)
    router = Router.from_config(cfg)
    router.load_state_dict({"weight": hf.weight, "selection_bias": hf.e_score_correction_bias})
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4))
    hf_logits, hf_weights, hf_indices = hf(x)
    logits, _ = router(x)
    assert_close(logits, hf_logits, rtol=1e-6, atol=1e-6)  # the recorded logits are the capped ones
    _same_choices(route(logits, cfg, selection_bias_E=router.selection_bias), hf_indices, hf_weights)


def test_softmax_top2_sum_groups_equal_transformers_mistral4_router():
    from transformers import Mistral4Config
    from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter

    hf_cfg = Mistral4Config(hidden_size=D, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                            norm_topk_prob=True, routed_scaling_factor=2.0)
    hf = Mistral4TopkRouter(hf_cfg)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, D, generator=torch.Generator().manual_seed(5)) * 0.5)
    options = dict(d_model=D, d_ff=6, num_experts=16, router="topk", top_k=4, n_group=4, topk_group=2,
                   normalize_topk=True, routed_scaling_factor=2.0)
    cfg = MoEConfig(**options, group_score="top2_sum")
    router = Router.from_config(cfg)
    router.load_state_dict({"weight": hf.weight})
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(6))
    hf_logits, hf_weights, hf_indices = hf(x)
    logits, _ = router(x)
    _same_choices(route(logits, cfg), hf_indices, hf_weights)
    by_max = route(logits, MoEConfig(**options, group_score="max"))  # the group score matters here
    assert not torch.equal(by_max.expert_SK.sort(-1).values, hf_indices.sort(-1).values)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (dict(router_logit_softcap=-1.0), r"MoEConfig.router_logit_softcap=-1.0 .*>= 0"),
    (dict(router_logit_softcap=float("nan")), r"router_logit_softcap=nan .*finite number"),
    (dict(scoring_func="sigmoid", normalize_topk=True, normalize_topk_eps=-1e-6), r"normalize_topk_eps=-1e-06 .*>= 0"),
    (dict(normalize_topk=True, normalize_topk_eps=0.0), r"normalize_topk_eps=0.0 .*scoring_func='softmax'"),
    (dict(scoring_func="sigmoid", normalize_topk_eps=1e-6), r"normalize_topk_eps=1e-06 .*normalize_topk=False"),
    (dict(router="gshard", normalize_topk_eps=0.0), r"normalize_topk_eps=0.0 .*router='topk' only"),
])
def test_bad_sigmoid_variant_options_raise_value_error_naming_the_field(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**{**dict(d_model=8, d_ff=16, num_experts=8, router="topk", top_k=2), **overrides})
