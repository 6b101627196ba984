"""The routers of issue 6 (topk, noisy_topk, soft, expert_choice), jitter, z-loss and shared
experts, each against a plain per-token reference written here from the papers' formulas.

The references loop over tokens (and experts) in Python and never call the library's routing or
layout code; expert math comes from ``tests.unit.reference.expert_forward`` (a per-token loop).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from expert_parallel.layout import assign_slots as plan_assign
from expert_parallel.layout import combine
from expert_parallel.routing import Router, noisy_topk
from tests.unit.layer_helpers import NUM_EXPERTS, make_input, make_layer
from tests.unit.reference import assign_slots, capacity_formula, expert_forward, softmax_row

S = 24


def _descending(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda e: -values[e])


def _cv_squared(values: list) -> torch.Tensor:
    """``var / mean^2`` with the population variance (Shazeer et al.; tensor2tensor)."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / (mean ** 2 + 1e-10)


def _mix(layer, x_SD, picks: list[list[tuple[int, torch.Tensor]]]) -> torch.Tensor:
    """``y_s = sum over (expert, weight) in picks[s] of weight * expert(x_s)``, token by token."""
    rows = []
    for s, pairs in enumerate(picks):
        y = x_SD.new_zeros(x_SD.shape[1])
        for e, w in pairs:
            y = y + w * expert_forward(layer, e, x_SD[s])
        rows.append(y)
    return torch.stack(rows)


def _token_choice_reference(layer, x_SD, decide, capacity):
    """Route each token with ``decide(s, logits_row) -> (experts, weights)``, give slots choice-major
    in token order (GShard Algorithm 1), drop past ``capacity``; return ``y`` and the decisions."""
    weight = layer.router.weight
    decisions = [decide(s, weight @ x_SD[s]) for s in range(x_SD.shape[0])]
    experts = [d[0] for d in decisions]
    _, kept, counts = assign_slots(experts, [[True] * len(e) for e in experts], layer.cfg.num_experts, capacity)
    picks = [[(e, w) for k, (e, w) in enumerate(zip(*d)) if kept[k][s]] for s, d in enumerate(decisions)]
    return _mix(layer, x_SD, picks), decisions, counts


@pytest.mark.parametrize("variant", ["plain", "normalize_topk", "gate_after_topk"])
def test_topk_layer_matches_per_token_reference(variant):
    options = {variant: True} if variant != "plain" else {}
    layer = make_layer(router="topk", top_k=3, capacity_factor=0.8, min_capacity=0, aux_loss_weight=0.3,
                       expert="swiglu", **options)
    x = make_input(S)
    capacity = capacity_formula(S, NUM_EXPERTS, 3, 0.8, 0)

    def decide(s, logits):
        probs = softmax_row(logits)
        chosen = _descending(probs.tolist())[:3]
        if variant == "gate_after_topk":  # softmax over the kept logits, written out
            exps = [torch.exp(logits[e] - max(logits[c] for c in chosen)) for e in chosen]
            return chosen, [v / sum(exps) for v in exps]
        if variant == "normalize_topk":
            return chosen, [probs[e] / sum(probs[c] for c in chosen) for e in chosen]
        return chosen, [probs[e] for e in chosen]

    out = layer(x)
    want, decisions, counts = _token_choice_reference(layer, x, decide, capacity)
    torch.testing.assert_close(out.output, want, rtol=1e-5, atol=1e-6)
    assert out.stats.capacity.item() == capacity and float(out.stats.dropped_fraction) > 0
    assert out.stats.tokens_per_expert.tolist() == counts
    # load balance over all S*k choices: E * sum_e (n_e / (S*k)) * mean_s p_se
    probs = [softmax_row(layer.router.weight @ x[s]) for s in range(S)]
    aux = sum(NUM_EXPERTS * counts[e] / (S * 3) * sum(p[e] for p in probs) / S for e in range(NUM_EXPERTS))
    torch.testing.assert_close(out.aux_loss, 0.3 * aux, rtol=1e-5, atol=1e-7)


def test_noisy_topk_eval_matches_the_paper_exactly():
    layer = make_layer(router="noisy_topk", top_k=2, capacity=S, aux_loss_weight=0.5,
                       importance_loss_weight=0.3, load_loss_weight=0.7).eval()
    with torch.no_grad():
        layer.router.noise_weight.normal_()  # eval must ignore it
    x = make_input(S)

    def decide(s, logits):  # H = x W_g (no noise); softmax over KeepTopK
        chosen = _descending(logits.tolist())[:2]
        exps = [torch.exp(logits[e]) for e in chosen]
        return chosen, [v / sum(exps) for v in exps]

    out = layer(x)
    want, decisions, counts = _token_choice_reference(layer, x, decide, S)
    torch.testing.assert_close(out.output, want, rtol=1e-5, atol=1e-6)
    importance = [sum(w for es, ws in decisions for e, w in zip(es, ws) if e == i) for i in range(NUM_EXPERTS)]
    # no noise: the load is the number of tokens per expert (tensor2tensor's eval path)
    aux = 0.3 * _cv_squared(importance) + 0.7 * _cv_squared([float(c) for c in counts])
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-5, atol=1e-7)
    assert layer.router.noise_weight.shape == (NUM_EXPERTS, layer.cfg.d_model)


def _top1_probability(clean: list[float], std: list[float], i: int) -> float:
    """``P(argmax(clean + std * z) = i)`` for independent normal ``z``: integrate over ``z_i``,
    ``int phi(z) prod_{j != i} Phi((c_i + s_i z - c_j) / s_j) dz`` by the trapezoid rule."""
    def cdf(v):
        return 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))

    total, steps, low, high = 0.0, 4000, -9.0, 9.0
    for n in range(steps + 1):
        z = low + (high - low) * n / steps
        value = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        for j in range(len(clean)):
            if j != i:
                value *= cdf((clean[i] + std[i] * z - clean[j]) / std[j])
        total += value * (0.5 if n in (0, steps) else 1.0)
    return total * (high - low) / steps


def test_noisy_topk_training_samples_experts_with_the_noise_distribution():
    # one token repeated: each copy draws its own N(0,1) * softplus(x W_noise)
    torch.manual_seed(0)
    layer = make_layer(router="noisy_topk", top_k=1, num_experts=3, drop_tokens=False).train()
    copies = 20000
    x1 = make_input(1)
    with torch.no_grad():
        layer.router.noise_weight.copy_(torch.randn(3, layer.cfg.d_model) * 0.3)
    clean = (layer.router.weight @ x1[0]).tolist()
    std = torch.nn.functional.softplus(layer.router.noise_weight @ x1[0]).tolist()
    counts = layer(x1.expand(copies, -1)).stats.tokens_per_expert.tolist()
    for i in range(3):
        want = _top1_probability(clean, std, i)
        assert abs(counts[i] / copies - want) < 0.015, (i, counts[i] / copies, want)


def test_noisy_topk_smooth_load_estimates_the_sampled_load():
    # E[P(x, i)] = P(i in top-k): the smooth load and the sampled counts agree on average
    gen = torch.Generator().manual_seed(3)
    distinct = torch.randn(8, 6, generator=gen) * 2.0
    logits = distinct.repeat(2000, 1)
    std = torch.rand(8, 6, generator=gen).add(0.3).repeat(2000, 1)
    torch.manual_seed(1)
    routing = noisy_topk(logits, 2, training=True,
                         noise_std_SE=std)
    counts = torch.bincount(routing.expert_SK.reshape(-1), minlength=6).tolist()
    want = _cv_squared([float(c) for c in counts])
    assert want > 0.05
    assert float(routing.losses["load"]) == pytest.approx(want, rel=0.05)
    weights = routing.weight_SK
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(weights.shape[0]))


def test_noisy_topk_losses_train_the_noise_projection():
    layer = make_layer(router="noisy_topk", top_k=2, importance_loss_weight=0.1, load_loss_weight=0.1,
                       aux_loss_weight=0.0).train()
    out = layer(make_input(S))
    out.aux_loss.backward()
    assert layer.router.noise_weight.grad.abs().sum() > 0 and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("train", [True, False])
def test_soft_mixture_is_the_probability_weighted_sum_of_all_experts(train):
    layer = make_layer(router="soft", expert_bias=True).train(train)
    x = make_input(S)
    picks = []
    for s in range(S):
        probs = softmax_row(layer.router.weight @ x[s])
        picks.append([(e, probs[e]) for e in range(NUM_EXPERTS)])
    out = layer(x)
    torch.testing.assert_close(out.output, _mix(layer, x, picks), rtol=1e-5, atol=1e-6)
    assert out.stats.capacity.item() == S and out.stats.dropped_fraction.item() == 0.0
    assert out.stats.k_eff.item() == NUM_EXPERTS and out.aux_loss.item() == 0.0


@pytest.mark.parametrize(("train", "options", "capacity"), [
    (True, dict(capacity_factor=1.0, min_capacity=0), capacity_formula(S, NUM_EXPERTS, 1, 1.0, 0)),
    (False, dict(eval_capacity_factor=0.5, min_capacity=0), capacity_formula(S, NUM_EXPERTS, 1, 0.5, 0)),
    (True, dict(capacity=4), 4),
])
def test_expert_choice_lets_each_expert_pick_its_top_tokens(train, options, capacity):
    layer = make_layer(router="expert_choice", expert="swiglu", **options).train(train)
    x = make_input(S)
    probs = [softmax_row(layer.router.weight @ x[s]) for s in range(S)]
    picks = [[] for _ in range(S)]
    for e in range(NUM_EXPERTS):  # expert e takes the C tokens with the largest p[s, e]
        for s in _descending([p[e].item() for p in probs])[:capacity]:
            picks[s].append((e, probs[s][e]))
    out = layer(x)
    torch.testing.assert_close(out.output, _mix(layer, x, picks), rtol=1e-5, atol=1e-6)
    assert out.stats.tokens_per_expert.tolist() == [capacity] * NUM_EXPERTS
    assert out.stats.dropped_fraction.item() == 0.0 and out.aux_loss.item() == 0.0
    assert out.stats.k_eff.item() == pytest.approx(NUM_EXPERTS * capacity / S)


def test_combine_with_more_choices_than_slots_ignores_nan_in_empty_slots():
    # K = E columns, 2 tokens picked per expert, 3 slots: the slot-major combine; slot 2 is empty
    active = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]).bool()
    experts = torch.arange(4).expand(5, 4)
    weight = torch.rand(5, 4) * active
    plan = plan_assign(experts, active, 4).plan(3)
    buffer = torch.randn(4, 3, 8)
    buffer[:, 2] = float("nan")
    want = torch.zeros(5, 8)
    for e in range(4):  # the tokens of expert e fill its slots in token order
        slot = 0
        for s in range(5):
            if active[s, e]:
                want[s] += weight[s, e] * buffer[e, slot]
                slot += 1
    torch.testing.assert_close(combine(buffer, plan, weight), want)


@pytest.mark.parametrize("router", ["switch", "topk", "soft", "expert_choice"])
def test_z_loss_is_mean_squared_logsumexp_of_the_logits(router):
    options = dict(top_k=1) if router == "switch" else {}
    layer = make_layer(router=router, aux_loss_weight=0.0, z_loss_weight=0.25, **options)
    x = make_input(S)
    z = 0.0
    for s in range(S):
        logits = (layer.router.weight @ x[s]).tolist()
        z += math.log(sum(math.exp(v) for v in logits)) ** 2
    assert layer(x).aux_loss.item() == pytest.approx(0.25 * z / S, rel=1e-5)


def test_jitter_multiplies_the_router_input_by_uniform_noise_in_training_only():
    router = Router(d_model=6, num_experts=6, jitter=0.2)
    with torch.no_grad():
        router.weight.copy_(torch.eye(6))  # logits = jittered input
    x = torch.rand(4000, 6) + 0.5
    factor = router.train()(x)[0] / x
    assert factor.min() >= 0.8 - 1e-6 and factor.max() <= 1.2 + 1e-6
    assert factor.mean().item() == pytest.approx(1.0, abs=0.005)
    assert factor.var().item() == pytest.approx(0.4 ** 2 / 12, rel=0.05)  # U(0.8, 1.2)
    assert torch.equal(router.eval()(x)[0], x)


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "soft", "expert_choice"])
def test_jitter_applies_to_every_router(router):
    x = make_input(S)
    options = {} if router == "soft" else dict(capacity=S)  # soft takes no capacity
    plain = make_layer(router=router, **options).eval()(x).output
    layer = make_layer(router=router, jitter_eps=0.3, **options)
    torch.testing.assert_close(layer.eval()(x).output, plain)
    assert not torch.allclose(layer.train()(x).output, plain)


@pytest.mark.parametrize("options,scale", [(dict(expert="swiglu"), 1.0),
                                           (dict(activation="relu", expert_bias=True), 1.0),
                                           (dict(expert="swiglu"), 0.5)])  # 0.5: Cohere 2's "average"
def test_shared_experts_add_every_shared_expert_to_every_token_times_the_scale(options, scale):
    layer = make_layer(router="topk", top_k=2, capacity=S, num_shared_experts=2, d_ff_shared=5,
                       shared_expert_scale=scale, **options)
    shared = layer.shared_experts
    assert shared.w1.shape == (2, 8, 5) and shared.w2.shape == (2, 5, 8)
    with torch.no_grad():
        for param in shared.parameters():
            param.normal_()
    x = make_input(S)
    routed = make_layer(router="topk", top_k=2, capacity=S, **options)
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    want = []
    for s in range(S):  # sum_j shared_j(x_s), written out
        y = torch.zeros(8)
        for j in range(2):
            h = x[s] @ shared.w1[j] + (shared.b1[j] if shared.b1 is not None else 0)
            h = torch.nn.functional.silu(h) * (x[s] @ shared.w3[j]) if shared.w3 is not None else torch.relu(h)
            y = y + h @ shared.w2[j] + (shared.b2[j] if shared.b2 is not None else 0)
        want.append(y * scale)
    torch.testing.assert_close(layer(x).output - routed(x).output, torch.stack(want), rtol=1e-4, atol=1e-5)


def test_shared_experts_are_dense_parameters_not_expert_parallel():
    layer = copy.deepcopy(make_layer(num_shared_experts=1, expert_bias=True))
    assert layer.experts.sharded and not layer.shared_experts.sharded
    assert layer.shared_experts.w1.shape == (1, 8, 12)  # d_ff_shared defaults to d_ff
