"""Noisy top-k gating in training, token by token, against a plain Python reference written from
Shazeer et al. 2017 ("Outrageously Large Neural Networks", section 2.1 and Appendix A).

The ``N(0, 1)`` draws are injected (``normal_SE``, or a patched ``torch.randn_like`` for the layer),
as the GShard tests inject their uniforms, so the training path is compared exactly. The reference
works on Python floats and never calls the library's routing code: ``kth_excluding(H, k, i)`` is
computed from its definition (the k-th largest of the other experts' noisy logits), not from the
library's "(k+1)-th if kept, else k-th" shortcut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from expert_parallel.routing import noisy_topk
from tests.unit.layer_helpers import make_input, make_layer
from tests.unit.reference import expert_forward

S, E = 20, 6


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _cv_squared(values: list[float]) -> float:
    """``var / mean^2``, population variance, with tensor2tensor's ``1e-10`` guard."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / (mean ** 2 + 1e-10)


@dataclass
class NoisyReference:
    experts: list[list[int]]  # per token, the kept experts by descending noisy logit
    weights: list[list[float]]  # per token, softmax over the kept noisy logits
    importance: float  # CV(sum of gates per expert)^2
    load: float  # CV(Load)^2, the smooth load


def noisy_reference(clean: list[list[float]], std: list[list[float]], normal: list[list[float]],
                    k: int) -> NoisyReference:
    """The paper's gating and both losses, one token at a time (``k < E``)."""
    num_experts = len(clean[0])
    experts, weights = [], []
    importance, load = [0.0] * num_experts, [0.0] * num_experts
    for c, sd, z in zip(clean, std, normal):
        noisy = [c[i] + z[i] * sd[i] for i in range(num_experts)]  # H(x) = x W_g + N(0,1) * softplus(x W_noise)
        kept = sorted(range(num_experts), key=lambda i: -noisy[i])[:k]  # KeepTopK
        top = max(noisy[e] for e in kept)
        exps = [math.exp(noisy[e] - top) for e in kept]
        gates = [v / sum(exps) for v in exps]  # softmax over the kept noisy logits
        experts.append(kept)
        weights.append(gates)
        for e, g in zip(kept, gates):
            importance[e] += g
        for i in range(num_experts):
            others = sorted((noisy[j] for j in range(num_experts) if j != i), reverse=True)
            kth_excluding = others[k - 1]
            load[i] += _normal_cdf((c[i] - kth_excluding) / sd[i])  # P(x, i)
    return NoisyReference(experts, weights, _cv_squared(importance), _cv_squared(load))


def _well_separated(noisy_SE: torch.Tensor) -> bool:
    """No near ties among a token's noisy logits (the top-k decision is then unambiguous)."""
    gaps = noisy_SE.sort(dim=-1).values.diff(dim=-1)
    return bool(gaps.min() > 1e-3)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_noisy_topk_training_matches_the_paper_token_by_token(top_k):
    gen = torch.Generator().manual_seed(7)
    clean = torch.randn(S, E, generator=gen) * 1.5
    std = torch.rand(S, E, generator=gen) * 1.2 + 0.3  # not 1: a missing scale would show
    normal = torch.randn(S, E, generator=gen)
    assert _well_separated(clean + normal * std)
    cfg = make_layer(router="noisy_topk", top_k=top_k, num_experts=E).cfg

    routing = noisy_topk(clean, cfg.num_choices, training=True, noise_std_SE=std, normal_SE=normal)
    want = noisy_reference(clean.tolist(), std.tolist(), normal.tolist(), top_k)

    assert routing.expert_SK.tolist() == want.experts
    torch.testing.assert_close(routing.weight_SK, torch.tensor(want.weights), rtol=1e-5, atol=1e-6)
    assert routing.active_SK.all()
    torch.testing.assert_close(routing.losses["importance"], torch.tensor(want.importance), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(routing.losses["load"], torch.tensor(want.load), rtol=1e-5, atol=1e-7)
    # the noise moved decisions: the clean top-k differs from the noisy one for some tokens
    clean_kept = [sorted(range(E), key=lambda i: -row[i])[:top_k] for row in clean.tolist()]
    assert clean_kept != want.experts


def test_layer_in_training_scales_the_injected_noise_by_its_routers_noise_std(monkeypatch):
    layer = make_layer(router="noisy_topk", top_k=2, num_experts=E, drop_tokens=False, aux_loss_weight=0.0,
                       importance_loss_weight=0.3, load_loss_weight=0.7).train()
    with torch.no_grad():
        noise_weight = torch.randn(E, layer.cfg.d_model, generator=torch.Generator().manual_seed(4))
        layer.router.noise_weight.copy_(noise_weight * 0.25)  # std between 0.1 and 2.5
    x = make_input(S)
    normal = torch.randn(S, E, generator=torch.Generator().manual_seed(5))

    def fake_randn_like(like, **kwargs):
        assert tuple(like.shape) == (S, E), f"unexpected draw of shape {tuple(like.shape)}"
        return normal.clone()

    monkeypatch.setattr(torch, "randn_like", fake_randn_like)
    out = layer(x)

    # the router's projections, per token: clean x W_g, std softplus(x W_noise) = log(1 + exp(.))
    weight, noise_weight = layer.router.weight.detach(), layer.router.noise_weight.detach()
    clean = [[float(weight[i] @ x[s]) for i in range(E)] for s in range(S)]
    std = [[math.log1p(math.exp(float(noise_weight[i] @ x[s]))) for i in range(E)] for s in range(S)]
    assert min(min(row) for row in std) > 0.1 and max(max(row) for row in std) > 1.2
    want = noisy_reference(clean, std, normal.tolist(), 2)
    assert [sorted(range(E), key=lambda i: -row[i])[:2] for row in clean] != want.experts  # the noise mattered

    rows = []
    for s in range(S):
        y = x.new_zeros(layer.cfg.d_model)
        for e, w in zip(want.experts[s], want.weights[s]):
            y = y + w * expert_forward(layer, e, x[s])
        rows.append(y)
    torch.testing.assert_close(out.output, torch.stack(rows).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss.detach(), torch.tensor(0.3 * want.importance + 0.7 * want.load),
                               rtol=1e-5, atol=1e-7)
