"""``run_ranks(..., reuse=True)``: the same processes serve later runs, each run starts as in a
fresh process (environment, torch switches, process groups), and a failure or timeout replaces
the ranks with fresh ones."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from expert_parallel.comm import groups
from expert_parallel.spawn import RankError, run_ranks

pytestmark = pytest.mark.distributed


def dirty(rank: int, world_size: int) -> int:
    """Leave behind what a run may change: an environment variable, torch switches, groups."""
    os.environ["SPAWN_POOL_LEAK"] = "1"
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    ep = groups.expert_groups(world_size).ep_group
    dist.new_group(list(range(world_size)))
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total, group=ep)
    return os.getpid(), total.item()


def state(rank: int, world_size: int) -> tuple:
    return (os.getpid(), os.environ.get("SPAWN_POOL_LEAK"), torch.get_default_dtype(), torch.is_grad_enabled(),
            len(dist.distributed_c10d._world.pg_map), len(groups._GROUPS))


def fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one fails")
    dist.barrier()


def sleep(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_pooled_ranks_serve_the_next_run_as_if_fresh():
    first = run_ranks(dirty, 2, reuse=True, timeout=120)
    assert [total for _, total in first] == [3.0, 3.0]
    after = run_ranks(state, 2, reuse=True, timeout=60)
    # the same processes, with the run's changes undone: only the world group is left
    assert [row[0] for row in after] == [pid for pid, _ in first]
    assert [row[1:] for row in after] == [(None, torch.float32, True, 1, 0)] * 2


@pytest.mark.slow  # three fresh pools
def test_a_failed_or_timed_out_run_is_reported_and_replaces_the_ranks():
    pids = [row[0] for row in run_ranks(state, 2, reuse=True, timeout=120)]
    with pytest.raises(RankError, match="rank one fails"):
        run_ranks(fail_on_rank_one, 2, reuse=True, timeout=60)
    fresh = [row[0] for row in run_ranks(state, 2, reuse=True, timeout=120)]
    assert not set(fresh) & set(pids)
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish within 2s"):
        run_ranks(sleep, 2, reuse=True, timeout=2)
    assert not set(row[0] for row in run_ranks(state, 2, reuse=True, timeout=120)) & set(fresh)
