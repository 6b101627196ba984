"""EP=2 and EP=4: outputs and gradients equal the single-process layer with the same full weights.

One spawn per world size runs every case; each case is then checked (in this process) against a
plain float64 loop over tokens and against the EP=1 layer, with the capacity the EP group must
agree on computed here from every rank's token count.
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks

from .reference import Case
from .scenarios import check_case, run_cases

pytestmark = pytest.mark.distributed

EP2_CASES = [
    Case("gshard-ffn-all-no-drops", 2, ((12,), (12,)),
         options=dict(second_policy="all", capacity_factor=4.0), seed=1),
    Case("gshard-ffn-random-drops", 2, ((16,), (16,)),
         options=dict(second_policy="random", capacity_factor=0.5), seed=2),
    Case("gshard-swiglu-threshold-drops-3d", 2, ((2, 7), (2, 7)),
         options=dict(expert="swiglu", second_policy="threshold", second_threshold=0.2,
                      capacity_factor=0.75), seed=3),
    Case("gshard-swiglu-bias-fixed-capacity", 2, ((10,), (10,)), num_experts=6,
         options=dict(expert="swiglu", expert_bias=True, second_policy="all", capacity=3), seed=4),
    Case("switch-ffn-relu-bias-drops", 2, ((16,), (16,)),
         options=dict(router="switch", top_k=1, activation="relu", expert_bias=True,
                      capacity_factor=0.5), seed=5),
    Case("switch-swiglu-no-drops", 2, ((9,), (9,)),
         options=dict(router="switch", top_k=1, expert="swiglu", capacity_factor=4.0), seed=6),
    # the padded batched-matmul fallback, and the sync-free dropless mode (the default compute is filled)
    Case("padded-gshard-ffn-random-drops", 2, ((16,), (16,)),
         options=dict(second_policy="random", capacity_factor=0.5, expert_compute="padded"), seed=7),
    Case("dropless-gshard-bias-skewed-no-drops", 2, ((12,), (12,)), skew=1.5,
         options=dict(second_policy="all", expert_bias=True, dropless=True), seed=8),
    # recompute="experts": the experts' hidden activations recomputed in the backward, filled and padded
    Case("recompute-gshard-swiglu-random-drops", 2, ((16,), (16,)),
         options=dict(expert="swiglu", second_policy="random", capacity_factor=0.5, recompute="experts"), seed=9),
    Case("recompute-padded-switch-ffn-bias-drops", 2, ((16,), (16,)),
         options=dict(router="switch", top_k=1, expert_bias=True, capacity_factor=0.5, expert_compute="padded",
                      recompute="experts"), seed=10),
]

EP4_CASES = [
    Case("gshard-ffn-all-no-drops", 4, ((6,),) * 4, num_experts=8,
         options=dict(second_policy="all", capacity_factor=8.0), seed=11),
    Case("gshard-swiglu-random-drops", 4, ((8,),) * 4,
         options=dict(expert="swiglu", second_policy="random", capacity_factor=0.5), seed=12),
    Case("switch-ffn-gelu-tanh-bias-drops", 4, ((10,),) * 4, num_experts=8,
         options=dict(router="switch", top_k=1, activation="gelu_tanh", expert_bias=True,
                      capacity_factor=0.5), seed=13),
    Case("switch-swiglu-no-drops", 4, ((2, 3),) * 4,
         options=dict(router="switch", top_k=1, expert="swiglu", capacity_factor=4.0), seed=14),
    Case("padded-switch-swiglu-drops", 4, ((8,),) * 4,
         options=dict(router="switch", top_k=1, expert="swiglu", capacity_factor=0.5, expert_compute="padded"),
         seed=15),
]


def _expect_drops(case: Case, refs: dict) -> None:
    """The case exercises what its name says: drops happen iff the name says so."""
    dropped = sum(ref["dropped"] for _, ref in refs.values())
    if "no-drops" in case.name:
        assert dropped == 0, f"{case.name}: the reference dropped {dropped} assignments"
    elif "drops" in case.name:
        assert dropped > 0, f"{case.name}: the reference dropped nothing; shrink the capacity"


@pytest.fixture(scope="module")
def ep2_results():
    return run_ranks(run_cases, 2, EP2_CASES, timeout=90)


@pytest.fixture(scope="module")
def ep4_results():
    return run_ranks(run_cases, 4, EP4_CASES, timeout=90)


@pytest.mark.parametrize("index", range(len(EP2_CASES)), ids=[c.name for c in EP2_CASES])
def test_ep2_output_and_grads_equal_single_process_layer(ep2_results, index):
    case = EP2_CASES[index]
    refs = check_case(case, [per_rank[index] for per_rank in ep2_results])
    _expect_drops(case, refs)


@pytest.mark.parametrize("index", range(len(EP4_CASES)), ids=[c.name for c in EP4_CASES])
@pytest.mark.slow
def test_ep4_output_and_grads_equal_single_process_layer(ep4_results, index):
    case = EP4_CASES[index]
    refs = check_case(case, [per_rank[index] for per_rank in ep4_results])
    _expect_drops(case, refs)
