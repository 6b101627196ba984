"""MoELayer capacity modes, RoutingStats, non-finite input, second-expert sampling, copy/pickle."""

from __future__ import annotations

import copy
import math
import pickle
import statistics

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.experts import sharded_expert_parameters
from tests.unit.layer_helpers import inject_uniforms, make_input, make_layer, uniforms
from tests.unit.reference import layer_reference


@pytest.mark.parametrize(("train", "want"), [(True, 25), (False, 40)])
def test_capacity_uses_train_or_eval_factor(train, want):
    # S=40, E=4, k=2: ceil(2*40*1.25/4) = 25 in training, ceil(2*40*2.0/4) = 40 in eval
    layer = make_layer(capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4).train(train)
    assert layer(make_input(40)).stats.capacity.item() == want


def test_switch_capacity_counts_one_choice_per_token():
    # S=40, E=4, k=1: ceil(40*1.25/4) = 13
    layer = make_layer(router="switch", top_k=1, capacity_factor=1.25, min_capacity=0)
    assert layer(make_input(40)).stats.capacity.item() == 13


def test_min_capacity_bounds_a_small_batch():
    # S=4: ceil(2*4*1.25/4) = 3 < min_capacity 4
    assert make_layer(min_capacity=4)(make_input(4)).stats.capacity.item() == 4


@pytest.mark.parametrize("train", [True, False])
def test_fixed_capacity_is_used_in_train_and_eval(train):
    layer = make_layer(capacity=3).train(train)
    assert layer(make_input(40)).stats.capacity.item() == 3


@pytest.mark.parametrize("train", [True, False])
def test_no_drop_mode_sizes_capacity_to_the_fullest_expert(train):
    layer = make_layer(drop_tokens=False, second_policy="all", capacity_factor=0.1).train(train)
    x = make_input(40)
    ref = layer_reference(layer, x, capacity=10**6)
    stats = layer(x).stats
    assert stats.capacity.item() == max(ref.counts)
    assert stats.dropped_fraction.item() == 0.0
    assert stats.dropped_fraction_by_choice.tolist() == [0.0, 0.0]


def _reference_stats(ref, num_tokens: int) -> dict:
    top_k = len(ref.kept)
    dispatched = [sum(d.active[k] for d in ref.decisions) for k in range(top_k)]
    dropped = [sum(ref.decisions[s].active[k] and not ref.kept[k][s] for s in range(num_tokens))
               for k in range(top_k)]
    return dict(
        tokens_per_expert=ref.counts,
        dropped_fraction=sum(dropped) / sum(dispatched),
        dropped_fraction_by_choice=[dropped[k] / dispatched[k] if dispatched[k] else 0.0 for k in range(top_k)],
        second_dispatched_fraction=dispatched[1] / num_tokens if top_k > 1 else 0.0,
        k_eff=sum(dispatched) / num_tokens,
        load_cv=statistics.pstdev(ref.counts) / statistics.mean(ref.counts),
    )


@pytest.mark.parametrize("capacity", [3, 6])
def test_routing_stats_match_reference_counts(capacity, monkeypatch):
    num_tokens = 24
    layer = make_layer(capacity=capacity)
    x, uniform = make_input(num_tokens), uniforms(num_tokens)
    with monkeypatch.context() as patch:
        inject_uniforms(patch, uniform)
        stats = layer(x).stats
    want = _reference_stats(layer_reference(layer, x, capacity, uniform.tolist()), num_tokens)
    assert 0 < want["dropped_fraction_by_choice"][1]  # drops happen to second choices
    assert 0 < want["second_dispatched_fraction"] < 1  # sampling skips some second choices
    assert stats.tokens_per_expert.tolist() == want["tokens_per_expert"]
    assert stats.tokens_per_expert.dtype == torch.long
    assert stats.dropped_fraction.item() == pytest.approx(want["dropped_fraction"])
    assert stats.dropped_fraction_by_choice.tolist() == pytest.approx(want["dropped_fraction_by_choice"])
    assert stats.dropped_fraction_first.item() == pytest.approx(want["dropped_fraction_by_choice"][0])
    assert stats.dropped_fraction_second.item() == pytest.approx(want["dropped_fraction_by_choice"][1])
    assert stats.second_dispatched_fraction.item() == pytest.approx(want["second_dispatched_fraction"])
    assert stats.k_eff.item() == pytest.approx(want["k_eff"])
    assert stats.load_cv.item() == pytest.approx(want["load_cv"], rel=1e-5)
    assert stats.capacity.item() == capacity
    assert stats.nonfinite_tokens.item() == 0
    assert all(not field.requires_grad for field in stats)


def test_switch_stats_have_no_second_choice():
    num_tokens = 24
    layer = make_layer(router="switch", top_k=1, capacity=4)
    x = make_input(num_tokens)
    stats = layer(x).stats
    want = _reference_stats(layer_reference(layer, x, 4), num_tokens)
    assert want["dropped_fraction"] > 0
    assert stats.tokens_per_expert.tolist() == want["tokens_per_expert"]
    assert stats.dropped_fraction_first.item() == pytest.approx(want["dropped_fraction"])
    assert stats.dropped_fraction_second.item() == 0.0
    assert stats.second_dispatched_fraction.item() == 0.0
    assert stats.k_eff.item() == 1.0


def test_nonfinite_tokens_are_counted():
    x = make_input(10)
    x[1, 0] = float("nan")
    x[3, 2] = float("inf")
    x[7, 5] = -float("inf")
    stats = make_layer()(x).stats
    assert stats.nonfinite_tokens.item() == 3


def test_check_finite_raises_on_nonfinite_input():
    x = make_input(10)
    x[4, 1] = float("nan")
    layer = make_layer(check_finite=True)
    with pytest.raises(ValueError, match=r"NaN or inf for 1 token\(s\).*check_finite"):
        layer(x)
    assert layer(make_input(10)).stats.nonfinite_tokens.item() == 0  # finite input passes


@pytest.mark.parametrize("train", [True, False])
def test_second_dispatched_fraction_matches_expected_sampling_rate(train):
    # P(dispatch 2nd) = P(u < 2*g2) = min(1, 2*g2); the count is a sum of independent Bernoullis.
    # The same in eval: GShard's random policy keeps sampling there (its reference never switches it off)
    num_tokens = 20000
    torch.manual_seed(0)
    layer = make_layer(d_model=16, d_ff=4, num_experts=8).train(train)
    x = torch.randn(num_tokens, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        top2 = (x @ layer.router.weight.t()).softmax(-1).sort(dim=-1, descending=True).values[:, :2].double()
    prob_S = (2 * top2[:, 1] / top2.sum(-1)).clamp(max=1.0)
    expected = prob_S.mean().item()
    sigma = math.sqrt((prob_S * (1 - prob_S)).sum().item()) / num_tokens
    assert 0.2 < expected < 0.95  # the sampling is far from all-or-nothing
    got = layer(x).stats.second_dispatched_fraction.item()
    assert abs(got - expected) < 5 * sigma, (got, expected, sigma)


def test_deepcopy_gives_an_independent_layer_with_equal_output():
    layer = make_layer(second_policy="all", expert_bias=True)
    twin = copy.deepcopy(layer)
    x = make_input(16)
    assert torch.equal(twin(x).output, layer(x).output)
    with torch.no_grad():
        twin.experts.w1.add_(1.0)
        twin.router.weight.zero_()
    assert not torch.equal(twin(x).output, layer(x).output)
    assert layer.router.weight.abs().sum() > 0


def test_pickle_round_trip_gives_equal_output():
    layer = make_layer(expert="swiglu", second_policy="all")
    restored = pickle.loads(pickle.dumps(layer))
    x = make_input(16)
    assert torch.equal(restored(x).output, layer(x).output)
    assert restored.cfg == layer.cfg


def _meta_then_to_empty(layer):
    with torch.device("meta"):
        rebuilt = make_layer(expert="swiglu", expert_bias=True, num_shared_experts=1)
    return rebuilt.to_empty(device="cpu")


def _assigned(layer):
    fresh = make_layer(expert="swiglu", expert_bias=True, num_shared_experts=1)
    fresh.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    return fresh


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _meta_then_to_empty,
                                   _assigned, pytest.param(torch.compile, marks=pytest.mark.slow)],
                         ids=["deepcopy", "pickle", "meta-to_empty", "load_state_dict-assign", "compile"])
def test_expert_parameters_are_found_by_structure_after_copies_and_rebuilds(clone):
    # gradient reduction over the expert-data-parallel group relies on this; shared experts are dense
    model = torch.nn.ModuleDict({"moe": clone(make_layer(expert="swiglu", expert_bias=True, num_shared_experts=1))})
    found = {id(p) for p in sharded_expert_parameters(model)}
    names = {name.replace("_orig_mod.", "") for name, p in model.named_parameters() if id(p) in found}
    assert names == {f"moe.experts.{n}" for n in ("w1", "w2", "w3", "b1", "b2")}


def test_a_layer_built_unbound_binds_later_to_the_same_layer():
    # build, then bind: bind=False builds every module; bind() ties the groups and the forward runs
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, ep_size=1, capacity=8, second_policy="all")
    torch.manual_seed(0)
    bound = MoELayer(cfg)
    torch.manual_seed(0)
    unbound = MoELayer(cfg, bind=False)
    assert unbound.ep_ranks is None and unbound.first_expert == 0
    x = torch.randn(6, 8)
    with pytest.raises(RuntimeError, match=r"not bound to its groups; call layer\.bind"):
        unbound(x)
    unbound.bind()
    assert unbound.ep_ranks == bound.ep_ranks == (0,)
    torch.testing.assert_close(unbound(x).output, bound(x).output, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(unbound.state_dict().values(), bound.state_dict().values()))


def test_an_unbound_layer_of_several_ep_ranks_has_no_first_expert_yet():
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4, ep_size=2), bind=False)
    with pytest.raises(RuntimeError, match=r"the layer has no EP group yet .*layer\.bind"):
        _ = layer.first_expert
