"""``normalize_topk_eps``: the epsilon of the sigmoid ``topk`` router's normalisation (LFM2-MoE's
``1e-6``, DeepSeek-V3's ``1e-20``), against a plain per-token reference; its validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from expert_parallel import MoEConfig
from expert_parallel.routing import route
from expert_parallel.routing.replay import replayed

S, E, K = 12, 8, 3


def reference_weights(logits: list[float], bias: list[float], eps: float,
                      scale: float) -> tuple[list[int], list[float]]:
    """One token, as LFM2-MoE's router: sigmoid scores, experts chosen by ``score + bias``, weights
    the unbiased scores over ``their sum + eps``, times ``scale``."""
    scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
    experts = sorted(range(len(logits)), key=lambda e: -(scores[e] + bias[e]))[:K]
    total = sum(scores[e] for e in experts) + eps
    return experts, [scores[e] / total * scale for e in experts]


@pytest.mark.parametrize("eps", [1e-6, 1e-20])
def test_sigmoid_normalisation_adds_the_epsilon_to_the_kept_sum(eps):
    """Small scores (logits near -8: sums near 1e-3), where 1e-6 and 1e-20 differ visibly."""
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=E, router="topk", top_k=K, scoring_func="sigmoid",
                    normalize_topk=True, normalize_topk_eps=eps, routed_scaling_factor=2.0, selection_bias=True,
                    dropless=True)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(S, E, generator=generator) - 8.0
    bias = torch.randn(E, generator=generator) * 1e-3
    want = [reference_weights(row, bias.tolist(), eps, 2.0) for row in logits.double().tolist()]
    routing = route(logits, cfg, selection_bias_E=bias)
    assert routing.expert_SK.tolist() == [experts for experts, _ in want]
    assert_close(routing.weight_SK, torch.tensor([weights for _, weights in want]), rtol=1e-5, atol=0.0)
    other = reference_weights(logits[0].double().tolist(), bias.tolist(), 1e-6 if eps == 1e-20 else 1e-20, 2.0)[1]
    assert not math.isclose(other[0], want[0][1][0], rel_tol=1e-4)  # the epsilon matters here
    # routing replay recomputes the weights with the same epsilon
    again = replayed(routing, logits, routing.expert_SK, routing.active_SK, cfg)
    assert torch.equal(again.weight_SK, routing.weight_SK)


@pytest.mark.parametrize("fields", [dict(scoring_func="sigmoid"), dict(normalize_topk=True),
                                    dict(scoring_func="sigmoid", normalize_topk=True, normalize_topk_eps=-1.0)])
def test_normalize_topk_eps_outside_sigmoid_normalisation_or_negative_is_refused(fields):
    with pytest.raises(ValueError, match=r"MoEConfig\.normalize_topk_eps=.* is invalid"):
        MoEConfig(d_model=4, d_ff=4, num_experts=E, router="topk", top_k=K,
                  **{"normalize_topk_eps": 1e-6, **fields})
