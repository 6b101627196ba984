"""Routers and the load-balancing loss against per-token Python references and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from expert_parallel import MoEConfig
from expert_parallel.routing import gshard_top2, load_balance_loss, route, switch_top1
from tests.unit.reference import first_argmax, gshard_decision, switch_decision

CFG = MoEConfig(d_model=8, d_ff=16, num_experts=6)


def _logits(num_tokens: int = 32, num_experts: int = 6, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=gen) * scale


def _uniforms(num_tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", ["random", "all", "threshold"])
def test_gshard_top2_matches_per_token_reference(policy):
    logits = _logits()
    uniform = _uniforms(logits.shape[0])
    cfg = CFG.replace(second_policy=policy, second_threshold=0.3)
    routing = gshard_top2(logits, cfg.second_policy, cfg.second_threshold, uniform_S=uniform)
    assert routing.expert_SK.shape == (32, 2) and routing.expert_SK.dtype == torch.long
    assert routing.priority_SK is None and routing.renormalize_kept is False
    for s in range(logits.shape[0]):
        probs = [math.exp(v) for v in logits[s].tolist()]
        probs = [p / sum(probs) for p in probs]
        ref = gshard_decision(torch.tensor(probs, dtype=torch.float64), policy, 0.3, uniform[s].item())
        assert routing.expert_SK[s].tolist() == ref.experts
        assert routing.active_SK[s].tolist() == ref.active
        want = [ref.gates[0].item(), ref.gates[1].item() if ref.active[1] else 0.0]
        assert routing.weight_SK[s].tolist() == pytest.approx(want, abs=1e-6)
        assert routing.probs_SE[s].tolist() == pytest.approx(probs, abs=1e-6)


def test_gshard_gates_of_a_hand_computed_token():
    # probs (0.5, 0.3, 0.2): e1=0, e2=1, g1 = 0.5/0.8 = 0.625, g2 = 0.375; 2*g2 = 0.75
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=3)
    taken = gshard_top2(logits, cfg.second_policy, cfg.second_threshold, uniform_S=torch.tensor([0.74]))
    assert taken.expert_SK.tolist() == [[0, 1]]
    assert taken.weight_SK[0].tolist() == pytest.approx([0.625, 0.375], abs=1e-6)
    skipped = gshard_top2(logits, cfg.second_policy, cfg.second_threshold, uniform_S=torch.tensor([0.76]))
    assert skipped.active_SK.tolist() == [[True, False]]
    assert skipped.weight_SK[0].tolist() == pytest.approx([0.625, 0.0], abs=1e-6)


def test_second_choice_is_dispatched_iff_twice_g2_exceeds_the_uniform():
    logits = _logits(64)
    uniform = _uniforms(64)
    routing = gshard_top2(logits, CFG.second_policy, uniform_S=uniform)
    top2 = logits.softmax(-1).sort(dim=-1, descending=True).values[:, :2]
    g2 = top2[:, 1] / top2.sum(-1)
    assert torch.equal(routing.active_SK[:, 1], 2 * g2 > uniform)
    assert routing.active_SK[:, 0].all()
    assert 0 < routing.active_SK[:, 1].sum() < 64  # both outcomes occur: the check is not vacuous


def test_second_choice_always_dispatched_with_policy_all():
    routing = gshard_top2(_logits(), "all")
    assert routing.active_SK.all()
    assert (routing.weight_SK > 0).all()
    assert torch.allclose(routing.weight_SK.sum(-1), torch.ones(32))


def test_threshold_policy_dispatches_second_iff_g2_above_threshold():
    # probs (0.6, 0.4, 0): g2 = 0.4 ; probs (0.9, 0.1, 0): g2 = 0.1
    logits = torch.tensor([[0.6, 0.4, 1e-9], [0.9, 0.1, 1e-9]]).log()
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=3, second_policy="threshold", second_threshold=0.2)
    routing = gshard_top2(logits, cfg.second_policy, cfg.second_threshold)
    assert routing.active_SK.tolist() == [[True, True], [True, False]]
    assert routing.weight_SK[1, 1].item() == 0.0


def test_gshard_ties_pick_the_lowest_expert_ids():
    # a zero token (padding) gives equal logits: e1 = argmax -> 0, e2 = argmax of the rest -> 1
    routing = gshard_top2(torch.zeros(3, 6), "all")
    assert routing.expert_SK.tolist() == [[0, 1]] * 3


def test_switch_ties_pick_the_lowest_expert_id():
    assert switch_top1(torch.zeros(3, 6)).expert_SK.tolist() == [[0]] * 3


def test_gshard_computes_in_fp32_for_bf16_logits():
    logits = _logits().bfloat16()
    routing = gshard_top2(logits, "all")
    assert routing.probs_SE.dtype == torch.float32 and routing.weight_SK.dtype == torch.float32
    assert torch.allclose(routing.probs_SE, logits.float().softmax(-1))


def test_gshard_aux_loss_is_the_unweighted_load_balance_loss_of_first_choices():
    logits = _logits(40)
    routing = gshard_top2(logits, CFG.second_policy, uniform_S=_uniforms(40))
    probs = logits.softmax(-1).tolist()
    num_experts = 6
    first = [first_argmax(row) for row in probs]
    want = num_experts * sum((first.count(e) / 40) * (sum(row[e] for row in probs) / 40)
                             for e in range(num_experts))
    assert routing.losses["load_balance"].item() == pytest.approx(want, rel=1e-5)


def test_switch_top1_weight_is_the_router_probability_of_the_choice():
    logits = _logits(24)
    routing = switch_top1(logits)
    assert routing.expert_SK.shape == (24, 1) and routing.active_SK.all()
    probs_rows = logits.softmax(-1)
    for s in range(24):
        ref = switch_decision(probs_rows[s])
        assert routing.expert_SK[s, 0].item() == ref.experts[0]
        assert routing.weight_SK[s, 0].item() == pytest.approx(probs_rows[s].max().item(), abs=1e-7)
    first = routing.expert_SK[:, 0].tolist()
    want = 6 * sum(first.count(e) / 24 * probs_rows[:, e].mean().item() for e in range(6))
    assert routing.losses["load_balance"].item() == pytest.approx(want, rel=1e-5)


def test_route_dispatches_on_the_router_name():
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=6, router="switch", top_k=1)
    assert route(_logits(), cfg).expert_SK.shape == (32, 1)
    assert route(_logits(), CFG).expert_SK.shape == (32, 2)


def test_load_balance_loss_is_one_for_a_uniform_router():
    num_experts = 4
    probs = torch.full((8, num_experts), 1.0 / num_experts)
    first = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert load_balance_loss(probs, first).item() == pytest.approx(1.0, abs=1e-7)
    # uniform probabilities give 1 whatever the first choices are: sum_e f_e = 1
    assert load_balance_loss(probs, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(1.0)


def test_load_balance_loss_of_a_hand_computed_case():
    # S=2, E=2: probs (0.8, 0.2), (0.6, 0.4); first choices 0, 0 -> f = (1, 0), P = (0.7, 0.3)
    # E^2 * mean(f * P) = 4 * (0.7 + 0) / 2 = 1.4
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    assert load_balance_loss(probs, torch.tensor([0, 0])).item() == pytest.approx(1.4, rel=1e-6)
    # first choices 0, 1 -> f = (0.5, 0.5): 4 * (0.35 + 0.15) / 2 = 1.0
    assert load_balance_loss(probs, torch.tensor([0, 1])).item() == pytest.approx(1.0, rel=1e-6)


def test_load_balance_loss_of_zero_tokens_is_zero_not_nan():
    loss = load_balance_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0


def test_load_balance_loss_gradient_flows_through_the_mean_probabilities():
    # d/dP_e of E * sum_e f_e P_e is E * f_e; dP_e/dprobs[s, e] = 1/S -> grad = E * f_e / S
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]], requires_grad=True)
    load_balance_loss(probs, torch.tensor([0, 0])).backward()
    assert probs.grad.tolist() == [[pytest.approx(1.0), 0.0], [pytest.approx(1.0), 0.0]]
