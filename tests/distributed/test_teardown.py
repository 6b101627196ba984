"""Tearing the process group down while MoELayer outputs are alive: the autograd graph holds the
tickets of the started all-to-alls, which must let go of their gloo works once waited for (a work
kept past ``destroy_process_group`` can abort the process at exit: ``terminate called without an
active exception``)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

from expert_parallel.comm import all_to_all_start
from tests.harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "distributed", "keep_outputs_alive.py")


def held_works(rank: int, world_size: int) -> dict[str, bool]:
    """Spawned: which works a started all-to-all's ticket still holds after wait and backward."""
    x = torch.full((world_size, 3), float(rank), requires_grad=True)
    pending = all_to_all_start(x, dist.group.WORLD)
    ticket = pending._ticket
    started = ticket.work is not None
    y = pending.wait()
    after_wait = ticket.work is not None
    y.sum().backward()
    return {"started": started, "after_wait": after_wait, "after_backward": ticket.grad_work is not None,
            "grad": bool((x.grad == 1).all())}


def test_a_started_all_to_all_lets_go_of_its_works_once_waited():
    for rank, held in enumerate(run_ranks(held_works, 2, timeout=60)):
        assert held == {"started": True, "after_wait": False, "after_backward": False, "grad": True}, rank


def _torchrun() -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_destroying_the_process_group_with_outputs_alive_never_aborts():
    with ThreadPoolExecutor(max_workers=2) as pool:  # two 2-rank jobs at a time
        runs = list(pool.map(lambda _: _torchrun(), range(10)))
    failed = [run for run in runs if run.returncode != 0 or "terminate called" in run.stderr]
    assert not failed, f"{len(failed)} of 10 runs aborted; the first's stderr:\n{failed[0].stderr[-3000:]}"
