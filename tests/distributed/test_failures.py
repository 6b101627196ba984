"""Bad configs and non-finite inputs fail on every rank that must fail, and nothing hangs.

Each attempt is followed by a world barrier: a rank stuck in a collective would make the spawn
time out. After all the failures a healthy forward/backward must still match the reference, so
no collective was left half-done.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import pytest
import torch
import torch.distributed as dist

from expert_parallel import MoEConfig, MoELayer, spawn
from tests.harness import run_ranks

from .reference import Case
from .scenarios import check_case, run_case

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD = 4
NAN_RANK = 1  # in EP group (0, 1); group (2, 3) is clean
CHECK_FINITE = {
    "capacity-factor": dict(capacity_factor=1.0),
    "fixed-capacity": dict(capacity=2),
    "no-drop": dict(drop_tokens=False),
}
# check_finite=False: NaN is counted, and the NaN rank's peers still get correct outputs
NAN_COUNTED = Case("nan-counted-not-raised", 2, ((6,),) * WORLD, nan_rank=NAN_RANK,
                   backward=False, options=dict(second_policy="all", capacity_factor=2.0), seed=51)
# after every failure above, the same processes still compute correctly
HEALTHY = Case("healthy-after-failures", 2, ((6,), (3,), (6,), (0,)),
               options=dict(second_policy="all", check_finite=True), seed=52)


def _cfg(**changes) -> MoEConfig:
    fields = dict(d_model=8, d_ff=12, num_experts=4, ep_size=2, second_policy="all")
    fields.update(changes)
    return MoEConfig(**fields)


def _attempt(fn: Callable[[], object]) -> tuple[str, str]:
    """``("ok", "")`` or ``(exception type, message)``; then a barrier so no rank is left behind."""
    try:
        fn()
        outcome = ("ok", "")
    except (ValueError, RuntimeError) as error:
        outcome = (type(error).__name__, str(error))
    dist.barrier()
    return outcome


def _nonfinite_forward(rank: int, value: float, **changes) -> Callable[[], object]:
    torch.manual_seed(0)
    layer = MoELayer(_cfg(check_finite=True, **changes))
    x = torch.randn(6, 8)
    if rank == NAN_RANK:
        x[3, 5] = value
    return lambda: layer(x)


def misconfigure(rank: int, world_size: int) -> dict:
    """Spawned worker: every failure, in the same order on every rank."""
    torch.manual_seed(rank)
    outcomes = {
        "experts-not-divisible": _attempt(lambda: MoELayer(_cfg(num_experts=6, ep_size=4))),
        "ep-size-not-dividing-world": _attempt(lambda: MoELayer(_cfg(num_experts=6, ep_size=3))),
        "world-group-for-ep-size-2": _attempt(lambda: MoELayer(_cfg(), ep_group=dist.group.WORLD)),
    }
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # collective: every rank makes both
    outcomes["pair-group-for-ep-size-4"] = _attempt(
        lambda: MoELayer(_cfg(ep_size=4), ep_group=pairs[rank // 2]))
    outcomes["wrong-d-model-on-every-rank"] = _attempt(lambda: MoELayer(_cfg())(torch.randn(3, 5)))
    width = 5 if rank == NAN_RANK else 8  # one rank's input is wrong, its EP peer's is fine
    outcomes["wrong-d-model-on-one-rank"] = _attempt(lambda: MoELayer(_cfg())(torch.randn(3, width)))
    for name, changes in CHECK_FINITE.items():
        outcomes[f"nan-{name}"] = _attempt(_nonfinite_forward(rank, float("nan"), **changes))
    outcomes["inf"] = _attempt(_nonfinite_forward(rank, float("inf")))
    # dropless with a declared bound: more tokens than it is invalid input; check_finite keeps an
    # agreement in flight, so the peer raises too; without one every rank over the bound raises alone
    bounded = _cfg(dropless=True, max_tokens_per_rank=4)
    many = 6 if rank == NAN_RANK else 3
    outcomes["over-bound-on-one-rank"] = _attempt(
        lambda: MoELayer(bounded.replace(check_finite=True))(torch.randn(many, 8)))
    outcomes["over-bound-on-every-rank"] = _attempt(lambda: MoELayer(bounded)(torch.randn(2, 3, 8)))
    return {"outcomes": outcomes, "nan_counted": run_case(rank, NAN_COUNTED),
            "healthy": run_case(rank, HEALTHY)}


@pytest.fixture(scope="module")
def results():
    return run_ranks(misconfigure, WORLD, timeout=90)


@pytest.mark.parametrize("attempt,message", [
    ("experts-not-divisible", "num_experts=6 is invalid: it is not divisible by ep_size=4"),
    ("ep-size-not-dividing-world", "ep_size=3 does not divide the world size 4"),
    ("world-group-for-ep-size-2", "ep_size=2 does not match the size 4 of ep_group"),
    ("pair-group-for-ep-size-4", "ep_size=4 does not match the size 2 of ep_group"),
    ("wrong-d-model-on-every-rank", "must be d_model=8"),
    ("over-bound-on-every-rank", "has 6 tokens (shape (2, 3, 8)), more than MoEConfig.max_tokens_per_rank=4"),
])
def test_bad_config_raises_value_error_on_every_rank(results, attempt, message):
    for rank, res in enumerate(results):
        kind, text = res["outcomes"][attempt]
        assert kind == "ValueError", f"rank {rank}: {kind} {text}"
        assert message in text, f"rank {rank}: {text}"


@pytest.mark.parametrize("attempt", [f"nan-{name}" for name in CHECK_FINITE] + ["inf"])
def test_nonfinite_input_on_one_rank_raises_on_its_whole_ep_group(results, attempt):
    outcomes = [res["outcomes"][attempt] for res in results]
    for rank in (0, 1):  # the NaN rank and its EP peer
        kind, text = outcomes[rank]
        assert kind == "ValueError", f"rank {rank}: {kind} {text}"
        assert "1 token(s)" in text and "check_finite" in text, f"rank {rank}: {text}"
    assert outcomes[2] == outcomes[3] == ("ok", ""), "the other EP group has finite input"


@pytest.mark.parametrize("attempt,message", [
    ("wrong-d-model-on-one-rank", "must be d_model=8"),
    # dropless with a declared bound: with check_finite an agreement is in flight to carry it
    ("over-bound-on-one-rank", "max_tokens_per_rank=4"),
])
def test_invalid_input_on_one_rank_stops_its_ep_peer_instead_of_hanging_it(results, attempt, message):
    outcomes = [res["outcomes"][attempt] for res in results]
    peer = 1 - NAN_RANK
    assert outcomes[NAN_RANK][0] == "ValueError" and message in outcomes[NAN_RANK][1]
    assert outcomes[peer][0] == "ValueError" and "another rank of this EP group" in outcomes[peer][1]
    assert outcomes[2] == outcomes[3] == ("ok", ""), "the other EP group has valid input"


def test_nonfinite_tokens_are_counted_and_spare_other_ranks_when_not_checked(results):
    check_case(NAN_COUNTED, [res["nan_counted"] for res in results])


def test_layers_still_match_reference_after_the_failures(results):
    check_case(HEALTHY, [res["healthy"] for res in results])



def test_spawn_timeout_bounds_the_whole_run_not_each_result():
    # results arrive 0.3 s apart, each gap shorter than the timeout, all together longer
    results: queue.Queue = queue.Queue()

    def report() -> None:
        for rank in range(4):
            results.put((rank, True, b""))
            time.sleep(0.3)
    threading.Thread(target=report, daemon=True).start()
    outcomes: dict = {}
    with pytest.raises(TimeoutError, match=r"ranks \[3\] did not finish within 0.75s"):
        spawn._collect(results, 4, 0.75, outcomes)
    assert sorted(outcomes) == [0, 1, 2]
