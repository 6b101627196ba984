"""Capacity, slot planning, pack and combine against GShard Algorithm 1 written as a Python loop."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from expert_parallel import MoEConfig, layout
from expert_parallel.layout import combine, expert_capacity, pack
from expert_parallel.routing import gshard_top2
from tests.unit.reference import assign_slots, gshard_decision


def plan_slots(expert_SK, active_SK, num_experts, capacity, priority_SK=None):
    """The library's plan at ``capacity``, with each assignment's rank ``slot_KS`` beside it."""
    slots = layout.assign_slots(expert_SK, active_SK, num_experts, priority_SK)
    plan = slots.plan(capacity)
    fields = {field.name: getattr(plan, field.name) for field in dataclasses.fields(plan)}
    return SimpleNamespace(**fields, slot_KS=slots.slot_KS)


def _random_choices(num_tokens: int, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-2 experts per token and a random dispatched mask (first choices always)."""
    gen = torch.Generator().manual_seed(seed)
    expert = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(num_tokens)])
    active = torch.ones(num_tokens, 2, dtype=torch.bool)
    active[:, 1] = torch.rand(num_tokens, generator=gen) < 0.6
    return expert, active


def _check_plan_against_reference(plan, expert, active, num_experts, capacity):
    slot, kept, counts = assign_slots(expert.tolist(), active.tolist(), num_experts, capacity)
    assert plan.kept_KS.tolist() == kept
    assert plan.count_E.tolist() == counts
    for k in range(expert.shape[1]):
        for s in range(expert.shape[0]):
            if active[s, k]:
                assert plan.slot_KS[k, s].item() == slot[k][s], (k, s)
            want_flat = expert[s, k].item() * capacity + slot[k][s] if kept[k][s] else num_experts * capacity
            assert plan.flat_index_KS[k, s].item() == want_flat, (k, s)


# (tokens, experts, k, capacity_factor, min_capacity) -> capacity, computed by hand
CAPACITY_CASES = [
    ((8, 4, 2, 1.0, 0), 4),      # 2*8*1/4 = 4
    ((10, 4, 2, 1.25, 0), 7),    # 6.25 -> 7
    ((10, 4, 1, 1.0, 0), 3),     # 2.5 -> 3
    ((3, 8, 2, 1.0, 4), 4),      # 0.75 -> 1, min_capacity 4 wins
    ((0, 4, 2, 1.0, 0), 1),      # 0, but at least 1
    ((100, 16, 2, 2.0, 4), 25),  # 25 exactly
    ((7, 7, 1, 0.5, 0), 1),      # 0.5 -> 1
    ((64, 8, 2, 1.25, 4), 20),   # 20 exactly
]


@pytest.mark.parametrize(("args", "want"), CAPACITY_CASES)
def test_capacity_formula_matches_hand_computed_table(args, want):
    assert expert_capacity(*args) == want


def test_capacity_is_exact_for_decimal_capacity_factors():
    # 1 * 100 * 1.1 / 11 = 10 exactly; float rounding (110.00000000000001) must not add a slot
    assert expert_capacity(100, 11, 1, 1.1, 0) == 10


@pytest.mark.parametrize("capacity", [1, 3, 5, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_slots_matches_algorithm_1_loop(capacity, seed):
    expert, active = _random_choices(num_tokens=24, num_experts=5, seed=seed)
    plan = plan_slots(expert, active, num_experts=5, capacity=capacity)
    assert (plan.num_experts, plan.capacity, plan.num_tokens) == (5, capacity, 24)
    _check_plan_against_reference(plan, expert, active, 5, capacity)


def test_second_choice_never_takes_a_slot_when_not_sampled():
    # C=2. t0 (e0, e1 unsampled), t1 (e1, e0 unsampled), t2 (e0, e1 sampled).
    # e1: first choice t1 -> slot 0; t0's unsampled second takes nothing; t2's second -> slot 1, kept
    expert = torch.tensor([[0, 1], [1, 0], [0, 1]])
    active = torch.tensor([[True, False], [True, False], [True, True]])
    plan = plan_slots(expert, active, num_experts=2, capacity=2)
    assert plan.slot_KS[1, 2].item() == 1
    assert plan.kept_KS.tolist() == [[True, True, True], [False, False, True]]
    assert plan.count_E.tolist() == [2, 2]
    assert (plan.flat_index_KS[1, :2] == 4).all()  # unsampled -> the scratch row E*C


def test_drops_hit_second_choices_first_then_latest_tokens():
    # C=3. e0 gets first choices of t0, t2, t3 and the second choice of t1 -> t1's second dropped
    # although t1 precedes t2, t3. e1 gets t1 first, then seconds of t0, t2, t3 -> t3 dropped.
    expert = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    active = torch.ones(4, 2, dtype=torch.bool)
    plan = plan_slots(expert, active, num_experts=2, capacity=3)
    assert plan.kept_KS.tolist() == [[True, True, True, True], [True, False, True, False]]
    assert plan.slot_KS.tolist() == [[0, 0, 1, 2], [1, 3, 2, 3]]


def test_first_choices_are_dropped_by_token_order_when_they_overflow():
    expert = torch.tensor([[2, 0]] * 5)
    active = torch.tensor([[True, False]] * 5)
    plan = plan_slots(expert, active, num_experts=3, capacity=2)
    assert plan.kept_KS[0].tolist() == [True, True, False, False, False]
    assert plan.count_E.tolist() == [0, 0, 5]


@pytest.mark.parametrize("capacity", [2, 4])
def test_priority_orders_slots_inside_each_expert(capacity):
    expert, active = _random_choices(num_tokens=16, num_experts=4, seed=3)
    priority = torch.randperm(32, generator=torch.Generator().manual_seed(4)).view(16, 2).float()
    plan = plan_slots(expert, active, 4, capacity, priority_SK=priority)
    for e in range(4):
        owners = [(priority[s, k].item(), k, s) for k in range(2) for s in range(16)
                  if active[s, k] and expert[s, k] == e]
        for rank, (_, k, s) in enumerate(sorted(owners)):
            assert plan.slot_KS[k, s].item() == rank
            assert plan.kept_KS[k, s].item() == (rank < capacity)


def test_equal_priorities_keep_choice_major_token_order():
    expert, active = _random_choices(num_tokens=12, num_experts=3, seed=5)
    plan = plan_slots(expert, active, 3, 4, priority_SK=torch.zeros(12, 2))
    _check_plan_against_reference(plan, expert, active, 3, 4)


def test_plan_of_zero_tokens_is_empty():
    plan = plan_slots(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.bool), 4, 3)
    assert plan.slot_KS.shape == (2, 0) and plan.kept_KS.shape == (2, 0)
    assert plan.count_E.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("capacity", [2, 20])
def test_router_and_plan_pipeline_matches_reference(capacity):
    gen = torch.Generator().manual_seed(7)
    num_tokens, num_experts = 20, 4
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
    uniform = torch.rand(num_tokens, generator=gen)
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=num_experts)
    routing = gshard_top2(logits, cfg.second_policy, cfg.second_threshold, uniform_S=uniform)
    plan = plan_slots(routing.expert_SK, routing.active_SK, num_experts, capacity)
    # reference: Algorithm 1 with the same uniforms
    probs = logits.double().softmax(-1)
    decisions = [gshard_decision(probs[s], "random", 0.0, uniform[s].item()) for s in range(num_tokens)]
    slot, kept, _ = assign_slots([d.experts for d in decisions], [d.active for d in decisions],
                                 num_experts, capacity)
    assert plan.kept_KS.tolist() == kept
    # combine a buffer whose slot (e, c) is the one-hot of e*C + c: y_s reads off every weight
    eye = torch.eye(num_experts * capacity).view(num_experts, capacity, -1)
    y = combine(eye, plan, routing.weight_SK)
    want = torch.zeros_like(y)
    for s, d in enumerate(decisions):
        for k in range(2):
            if kept[k][s]:
                want[s, d.experts[k] * capacity + slot[k][s]] = d.gates[k].item()
    assert torch.allclose(y, want, atol=1e-6)
    dropped = sum(decisions[s].active[k] and not kept[k][s] for k in range(2) for s in range(num_tokens))
    assert (dropped > 0) == (capacity == 2)  # the small capacity really drops, 20 = S never does


def test_pack_copies_each_kept_token_into_its_slot_and_zeros_the_rest():
    expert, active = _random_choices(num_tokens=10, num_experts=3, seed=8)
    capacity = 3
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(9), requires_grad=True)
    plan = plan_slots(expert, active, 3, capacity)
    buffer = pack(x, plan)
    slot, kept, _ = assign_slots(expert.tolist(), active.tolist(), 3, capacity)
    want = torch.zeros(3, capacity, 5)
    grad_want = torch.zeros(10, 5)
    upstream = torch.randn(3, capacity, 5, generator=torch.Generator().manual_seed(10))
    for k in range(2):
        for s in range(10):
            if kept[k][s]:
                want[expert[s, k], slot[k][s]] = x[s].detach()
                grad_want[s] += upstream[expert[s, k], slot[k][s]]
    assert torch.equal(buffer, want)
    buffer.backward(upstream)
    assert torch.allclose(x.grad, grad_want, atol=1e-6)


def _nan_buffer_plan():
    """A plan with drops and unsampled choices, and a buffer that is NaN outside the kept slots
    (expert 2 gets nothing, so the buffer's last rows are NaN too)."""
    expert = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    active = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    plan = plan_slots(expert, active, num_experts=3, capacity=2)
    buffer = torch.full((3, 2, 3), float("nan"))
    kept_slots = {(expert[s, k].item(), plan.slot_KS[k, s].item())
                  for k in range(2) for s in range(4) if plan.kept_KS[k, s]}
    for e, c in kept_slots:
        buffer[e, c] = torch.tensor([1.0, 2.0, 3.0]) * (e * 2 + c + 1)
    return plan, buffer


def test_combine_gives_exact_zero_for_dropped_choices_even_over_nan():
    plan, buffer = _nan_buffer_plan()
    weight = torch.tensor([[0.6, 0.4], [0.7, 0.0], [0.9, 0.1], [0.8, 0.2]])
    y = combine(buffer, plan, weight)
    # e0 slots: t0, t1 (first choices); t2's first dropped, t3's second dropped.
    # e1 slots: t3 (first), t0 (second); t2's second dropped. t2 has nothing kept.
    row = torch.tensor([1.0, 2.0, 3.0])
    want = torch.stack([0.6 * 1 * row + 0.4 * 4 * row, 0.7 * 2 * row, torch.zeros(3), 0.8 * 3 * row])
    assert torch.isfinite(y).all()
    assert torch.allclose(y, want)
    assert torch.equal(y[2], torch.zeros(3))


def test_combine_gradient_of_dropped_choices_is_zero_even_over_nan():
    plan, buffer = _nan_buffer_plan()
    weight = torch.tensor([[0.6, 0.4], [0.7, 0.0], [0.9, 0.1], [0.8, 0.2]], requires_grad=True)
    combine(buffer, plan, weight).sum().backward()
    # d y_s / d w_sk = sum_d out[slot_sk] for kept choices, 0 for the rest
    want = torch.tensor([[6.0, 24.0], [12.0, 0.0], [0.0, 0.0], [18.0, 0.0]])
    assert torch.equal(weight.grad, want)


@pytest.mark.parametrize(("capacity", "num_chunks"), [(10, 4), (8, 2), (5, 1), (3, 4), (7, 7), (1, 3)])
def test_chunks_cover_every_slot_once_with_sizes_one_apart(capacity, num_chunks):
    bounds = layout.chunk_bounds(capacity, num_chunks)
    assert len(bounds) == min(capacity, num_chunks)
    assert [first for first, _ in bounds] == [sum(size for _, size in bounds[:i]) for i in range(len(bounds))]
    sizes = [size for _, size in bounds]
    assert sum(sizes) == capacity and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_chunks_of_ten_slots_in_four():
    assert layout.chunk_bounds(10, 4) == [(0, 3), (3, 3), (6, 2), (8, 2)]


def test_fill_within_counts_the_filled_slots_of_a_window_by_counting_them():
    fill = torch.tensor([[0, 3, 5], [7, 10, 2]])
    for first, size in [(0, 4), (3, 3), (6, 4), (9, 1)]:
        counted = torch.tensor([[sum(first <= slot < first + size for slot in range(int(n))) for n in row]
                                for row in fill.tolist()])
        assert torch.equal(layout.fill_within(fill, first, size), counted)
