"""The expert and routing variants of GPT-OSS, DBRX and Llama 4 against per-token references
written out here: the clamped SwiGLU with a bias on every projection, the p-norm of the kept
weights, and the router weight scaling the expert's input instead of its output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.routing import topk

D, FF, E, S = 8, 12, 4, 10


def make_layer(**options) -> MoELayer:
    """A dropless top-2 layer with every weight (biases included) ~N(0, 0.5)."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=D, d_ff=FF, num_experts=E, router="topk", top_k=2, dropless=True, aux_loss_weight=0.0,
                    **options)
    layer = MoELayer(cfg)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.5)
    return layer


def gpt_oss_expert(experts, e: int, h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's expert ``e`` on one token, element by element in Python floats."""
    gate = (h @ experts.w1[e] + experts.b1[e]).tolist()
    up = (h @ experts.w3[e] + experts.b3[e]).tolist()
    hidden = []
    for g, u in zip(gate, up):
        g, u = min(g, limit), max(-limit, min(u, limit))
        hidden.append((u + 1.0) * g / (1.0 + math.exp(-alpha * g)))
    return torch.tensor(hidden) @ experts.w2[e] + experts.b2[e]


@pytest.mark.parametrize("recompute", ["none", "experts"])
def test_clamped_swiglu_experts_with_biases_on_every_projection_match_a_per_token_reference(recompute):
    alpha, limit = 1.3, 0.6
    layer = make_layer(expert="clamped_swiglu", expert_bias=True, expert_up_bias=True, swiglu_alpha=alpha,
                       swiglu_limit=limit, recompute=recompute)
    x = torch.randn(S, D)
    with torch.no_grad():
        y = layer(x).output
        experts, want = layer.experts, torch.zeros(S, D)
        gates = x @ experts.w1.transpose(0, 1).reshape(D, -1)
        assert (gates > limit).any() and (gates < limit).any()  # the clamp is hit, and not everywhere
        for s in range(S):
            probs = torch.softmax(x[s] @ layer.router.weight.t(), dim=-1)
            for e in probs.topk(2).indices.tolist():
                want[s] += probs[e] * gpt_oss_expert(experts, e, x[s], alpha, limit)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # the gradients: the recomputed backward (clamp, glu and the up bias) equals the kept one
    kept = make_layer(expert="clamped_swiglu", expert_bias=True, expert_up_bias=True, swiglu_alpha=alpha,
                      swiglu_limit=limit)
    for each in (layer, kept):
        each(x).output.square().sum().backward()
    for (name, param), other in zip(layer.named_parameters(), kept.parameters()):
        torch.testing.assert_close(param.grad, other.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_kept_weights_divided_by_their_p_norm_match_a_per_token_reference():
    logits = torch.randn(S, E)
    weight = topk(logits, 2, normalize_topk=True, normalize_topk_p=2.0).weight_SK
    for s in range(S):
        probs = torch.softmax(logits[s], dim=-1).tolist()
        kept = sorted(probs, reverse=True)[:2]
        norm = math.sqrt(sum(p * p for p in kept))
        torch.testing.assert_close(weight[s], torch.tensor([p / norm for p in kept]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("expert_compute", ["padded", "filled"])
def test_the_router_weight_scales_the_expert_input_and_its_gradient_reaches_the_router(expert_compute):
    """Llama 4: ``y = sum_k expert_k(sigmoid(logit_k) * x)``, outputs summed unweighted."""
    layer = make_layer(expert="swiglu", scoring_func="sigmoid", scale_expert_input=True,
                       expert_compute=expert_compute)
    assert layer.filled_compute == (expert_compute == "filled")
    x = torch.randn(S, D)
    layer(x).output.square().sum().backward()
    router = layer.router.weight.detach().clone().requires_grad_(True)
    w1, w3, w2 = (w.detach() for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2))
    want = []
    for s in range(S):
        logits = x[s] @ router.t()
        out = torch.zeros(D)
        for e in logits.detach().topk(2).indices.tolist():
            h = torch.sigmoid(logits[e]) * x[s]
            out = out + (F.silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]
        want.append(out)
    want = torch.stack(want)
    want.square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).output, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, router.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options,match", [
    (dict(swiglu_limit=5.0), r"swiglu_limit=5.0 is invalid: it shapes expert='clamped_swiglu'"),
    (dict(expert="clamped_swiglu", swiglu_alpha=0.0), r"swiglu_alpha=0.0 is invalid: it must be > 0"),
    (dict(expert="swiglu", expert_up_bias=True), r"expert_up_bias=True is invalid: .*expert_bias=False"),
    (dict(expert="ffn", expert_bias=True, expert_up_bias=True), r"expert_up_bias=True is invalid"),
    (dict(router="topk", normalize_topk_p=2.0), r"normalize_topk_p=2.0 is invalid: .*set normalize_topk=True"),
    (dict(router="topk", normalize_topk=True, normalize_topk_p=-1.0), r"normalize_topk_p=-1.0 is invalid"),
    (dict(router="gshard", normalize_topk_p=2.0), r"normalize_topk_p=2.0 is invalid: it is implemented by "
                                                  r"router='topk' only"),
])
def test_the_variant_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{"d_model": D, "d_ff": FF, "num_experts": E, **options})
