"""A valid custom ``ep_group`` of strided ranks ({0, 2} and {1, 3} on 4 ranks) computes what the
single-process reference computes, and the library's own consecutive groups keep working next to it.

EP rank ``i`` of a strided group holds global experts ``i * E_local ..``; its tokens meet only its
group's peers, so each group agrees on its own capacity (the token counts differ between the
groups, and differ from what the consecutive blocks {0, 1} and {2, 3} would agree on).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from expert_parallel.comm import expert_groups
from tests.harness import run_ranks

from .reference import Case
from .scenarios import check_case, run_case

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD = 4
TOKENS = ((6,), (10,), (6,), (10,))  # per rank: groups {0, 2} and {1, 3} agree on 6 and 10 tokens
OPTIONS = dict(second_policy="all", capacity_factor=0.75)
STRIDED = Case("strided-ep-groups", 2, TOKENS, options=OPTIONS, seed=61, groups=((0, 2), (1, 3)))
CONSECUTIVE = Case("consecutive-ep-groups-next-to-strided-ones", 2, TOKENS, options=OPTIONS, seed=62)


def run_strided_and_consecutive(rank: int, world_size: int) -> dict:
    """Spawned worker: a layer on this rank's strided group, then one on the library's groups,
    built after the strided layer registered its group (each rank registered a different one)."""
    # new_group is collective: every rank creates both strided groups, in the same order
    strided = {group: dist.new_group(list(group)) for group in STRIDED.ep_groups()}
    result = {"strided": run_case(rank, STRIDED, ep_group=strided[STRIDED.ep_group_of(rank)])}
    groups = expert_groups(STRIDED.ep_size)  # creates (0, 1), (2, 3), (0, 2), (1, 3) on every rank
    result["replica_sum"] = _sum_of_ranks(groups.expert_dp_group)
    result["consecutive"] = run_case(rank, CONSECUTIVE)
    return result


def _sum_of_ranks(group: dist.ProcessGroup) -> int:
    value = torch.tensor([dist.get_rank()])
    dist.all_reduce(value, group=group)
    return int(value)


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(run_strided_and_consecutive, WORLD, timeout=90)


def _assert_drops(refs: dict) -> None:
    assert sum(ref["dropped"] for _, ref in refs.values()) > 0, "no drops: the groups' capacities do not matter"


def test_the_librarys_groups_are_built_alike_on_every_rank_after_a_custom_group(results):
    # replicas of EP position 0 are ranks 0 and 2, of position 1 ranks 1 and 3
    assert [res["replica_sum"] for res in results] == [2, 4, 2, 4]


def test_strided_ep_group_output_and_grads_equal_single_process_reference(results):
    _assert_drops(check_case(STRIDED, [res["strided"] for res in results]))


def test_consecutive_groups_still_compute_the_reference_next_to_a_strided_group(results):
    _assert_drops(check_case(CONSECUTIVE, [res["consecutive"] for res in results]))
