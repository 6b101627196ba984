"""A valid custom ``ep_group`` of strided ranks ({0, 2} and {1, 3} on 4 ranks) computes what the
single-process reference computes, and the library's own consecutive groups keep working next to it.

EP rank ``i`` of a strided group holds global experts ``i * E_local ..``; its tokens meet only its
group's peers, so each group agrees on its own capacity (the token counts differ between the
groups, and differ from what the consecutive blocks {0, 1} and {2, 3} would agree on).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from expert_parallel.comm import expert_groups
from tests.harness import run_ranks

from .reference import Case
from .scenarios import check_case, run_case

WORLD = 4
TOKENS = ((6,), (10,), (6,), (10,))  # per rank: groups {0, 2} and {1, 3} agree on 6 and 10 tokens
OPTIONS = dict(second_policy="all", capacity_factor=0.75)
STRIDED = Case("strided-ep-groups", 2, TOKENS, options=OPTIONS, seed=61, groups=((0, 2), (1, 3)))
CONSECUTIVE = Case("consecutive-ep-groups-next-to-strided-ones", 2, TOKENS, options=OPTIONS, seed=62)


def run_strided_and_consecutive(rank: int, world_size: int) -> dict:
    """Spawned worker: a layer on this rank's strided group, then one on the library's groups."""
    expert_groups(STRIDED.ep_size)  # the library's consecutive groups exist too, built first
    # new_group is collective: every rank creates both strided groups, in the same order
    strided = {group: dist.new_group(list(group)) for group in STRIDED.ep_groups()}
    return {"strided": run_case(rank, STRIDED, ep_group=strided[STRIDED.ep_group_of(rank)]),
            "consecutive": run_case(rank, CONSECUTIVE)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(run_strided_and_consecutive, WORLD, timeout=90)


def _assert_drops(refs: dict) -> None:
    assert sum(ref["dropped"] for _, ref in refs.values()) > 0, "no drops: the groups' capacities do not matter"


def test_strided_ep_group_output_and_grads_equal_single_process_reference(results):
    _assert_drops(check_case(STRIDED, [res["strided"] for res in results]))


def test_consecutive_groups_still_compute_the_reference_next_to_a_strided_group(results):
    _assert_drops(check_case(CONSECUTIVE, [res["consecutive"] for res in results]))
