"""Uneven batches (a rank with 0 tokens), drop_tokens=False and eval capacity over EP groups.

Every rank must use one capacity: ``max(min_capacity, ceil(k * S * cf / E))`` with ``S`` the
largest token count in the EP group (``eval_capacity_factor`` in eval mode), or the fullest
expert's load in the group with ``drop_tokens=False``.
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks

from .reference import Case, capacity_formula
from .scenarios import check_case, run_cases

pytestmark = pytest.mark.distributed

EP2_CASES = [
    Case("uneven-gshard-random-empty-rank", 2, ((9,), (0,)),
         options=dict(second_policy="random", capacity_factor=1.0), seed=31),
    Case("uneven-switch-3d-empty-rank", 2, ((0, 4), (3, 4)),
         options=dict(router="switch", top_k=1, capacity_factor=0.5), seed=32),
    Case("uneven-gshard-swiglu", 2, ((3,), (14,)),
         options=dict(expert="swiglu", second_policy="all", capacity_factor=0.75), seed=33),
    Case("uneven-fixed-capacity-empty-rank", 2, ((0,), (11,)),
         options=dict(second_policy="all", capacity=3), seed=37),
    Case("no-drop-skewed", 2, ((12,), (12,)), skew=1.5,
         options=dict(drop_tokens=False, second_policy="all", capacity_factor=1.0), seed=34),
    Case("no-drop-uneven-empty-rank", 2, ((0,), (10,)), skew=1.0,
         options=dict(drop_tokens=False, router="switch", top_k=1), seed=35),
    Case("eval-capacity", 2, ((10,), (6,)), eval=True,
         options=dict(second_policy="all", capacity_factor=0.5, eval_capacity_factor=1.5), seed=36),
    Case("train-capacity", 2, ((10,), (6,)),
         options=dict(second_policy="all", capacity_factor=0.5, eval_capacity_factor=1.5), seed=36),
    # dropless (the Hugging Face conversion's default) with other token counts on each rank, 0 included
    Case("dropless-empty-rank", 2, ((5,), (0,)), skew=1.0, options=dict(dropless=True, second_policy="all"), seed=38),
    Case("dropless-uneven-3d-chunked", 2, ((7,), (1, 3)),
         options=dict(dropless=True, expert="swiglu", num_chunks=2), seed=39),
    Case("dropless-bound-empty-rank", 2, ((0, 4), (2, 3)), skew=1.0,
         options=dict(dropless=True, max_tokens_per_rank=8, second_policy="all"), seed=40),
    Case("dropless-bound-uneven", 2, ((7,), (3,)),
         options=dict(dropless=True, max_tokens_per_rank=7, router="switch", top_k=1, expert_compute="padded"),
         seed=44),
]

EP4_CASES = [
    Case("uneven-gshard-empty-rank", 4, ((5,), (0,), (11,), (3,)),
         options=dict(second_policy="all", capacity_factor=1.0), seed=41),
    Case("no-drop-skewed-uneven", 4, ((6,), (0,), (9,), (4,)), skew=1.5, num_experts=8,
         options=dict(drop_tokens=False, expert="swiglu", second_policy="threshold",
                      second_threshold=0.1), seed=42),
    Case("eval-capacity", 4, ((4,), (7,), (2,), (7,)), eval=True,
         options=dict(router="switch", top_k=1, capacity_factor=0.5, eval_capacity_factor=3.0),
         seed=43),
    Case("dropless-uneven", 4, ((5,), (0,), (7,), (3,)), num_experts=8,
         options=dict(dropless=True, second_policy="all"), seed=45),
]
CASES = {2: EP2_CASES, 4: EP4_CASES}


def _spawn(world_size: int) -> dict:
    """``{name: (case, per-rank results)}``, one spawn per world size (EP = world)."""
    cases = CASES[world_size]
    results = run_ranks(run_cases, world_size, cases, timeout=90)
    return {case.name: (case, [per_rank[i] for per_rank in results]) for i, case in enumerate(cases)}


@pytest.fixture(scope="module")
def world2():
    return _spawn(2)


@pytest.fixture(scope="module")
def world4():
    return _spawn(4)


def _case(request, world_size: int, name: str):
    return request.getfixturevalue(f"world{world_size}")[name]


def _capacities(results: list[dict]) -> list[int]:
    return [int(r["stats"]["capacity"]) for r in results]


@pytest.mark.parametrize("world_size,name", [
    (2, "uneven-gshard-random-empty-rank"), (2, "uneven-switch-3d-empty-rank"),
    (2, "uneven-gshard-swiglu"), (2, "uneven-fixed-capacity-empty-rank"),
    pytest.param(4, "uneven-gshard-empty-rank", marks=pytest.mark.slow)])
def test_uneven_batches_agree_on_capacity_of_largest_rank(request, world_size, name):
    case, results = _case(request, world_size, name)
    check_case(case, results)
    cfg = case.config()
    largest = max(case.num_tokens(r) for r in range(case.world_size))
    expected = cfg.capacity or capacity_formula(largest, cfg, cfg.capacity_factor)
    assert _capacities(results) == [expected] * case.world_size
    for rank, res in enumerate(results):
        assert res["y"].shape == (*case.tokens[rank], case.d_model)


@pytest.mark.parametrize("world_size,name", [
    (2, "no-drop-skewed"), (2, "no-drop-uneven-empty-rank"),
    pytest.param(4, "no-drop-skewed-uneven", marks=pytest.mark.slow)])
def test_no_drop_capacity_is_fullest_expert_of_the_group(request, world_size, name):
    case, results = _case(request, world_size, name)
    refs = check_case(case, results)
    loads = [int(ref["count"].max()) for _, ref in refs.values()]
    assert _capacities(results) == [max(loads)] * case.world_size
    for res in results:
        assert float(res["stats"]["dropped_fraction"]) == 0.0
    cfg = case.config()
    even = capacity_formula(max(case.num_tokens(r) for r in range(case.world_size)), cfg,
                            cfg.capacity_factor)
    assert max(loads) > even, "the skew did not overload an expert; the case would not need it"


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_eval_mode_uses_eval_capacity_factor_on_every_rank(request, world_size):
    case, results = _case(request, world_size, "eval-capacity")
    check_case(case, results)
    cfg = case.config()
    largest = max(case.num_tokens(r) for r in range(case.world_size))
    expected = capacity_formula(largest, cfg, cfg.eval_capacity_factor)
    assert expected != capacity_formula(largest, cfg, cfg.capacity_factor)
    assert _capacities(results) == [expected] * case.world_size


def test_train_mode_uses_capacity_factor_for_the_same_batch(world2):
    case, results = world2["train-capacity"]
    check_case(case, results)
    cfg = case.config()
    assert _capacities(results) == [capacity_formula(10, cfg, cfg.capacity_factor)] * 2


@pytest.mark.parametrize("world_size,name", [
    (2, "dropless-empty-rank"), (2, "dropless-uneven-3d-chunked"), (4, "dropless-uneven"),
    (2, "dropless-bound-empty-rank"), (2, "dropless-bound-uneven")])
def test_dropless_takes_any_token_count_per_rank_and_drops_nothing(request, world_size, name):
    # the buffers hold the group's largest token count (or the declared bound), so the
    # all-to-all sizes agree and every token reaches its experts: output and gradients
    # equal the single-process computation without a capacity
    case, results = _case(request, world_size, name)
    check_case(case, results)
    cfg = case.config()
    expected = cfg.max_tokens_per_rank or max(case.num_tokens(r) for r in range(case.world_size))
    assert _capacities(results) == [expected] * case.world_size
    for res in results:
        assert float(res["stats"]["dropped_fraction"]) == 0.0
