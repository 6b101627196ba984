"""Run a function on N local gloo ranks (tests, benchmarks, examples), with a free port and a
timeout so a hang fails instead of blocking."""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A spawned rank raised; the message holds every failing rank's traceback."""


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any,
            threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
        # tensors travel as torch.save bytes: shared-memory handles die with the child
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
              threads_per_rank: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    ``fn`` must be a module-level function; its return values (picklable) come back ordered by
    rank. Raises ``RankError`` with every failing rank's traceback, or ``TimeoutError``
    naming the ranks that did not finish within ``timeout`` seconds of the start, for the whole
    run (they are killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results,
                                                      threads_per_rank))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        _collect(results, world_size, timeout, outcomes, procs)
    except TimeoutError as timed_out:
        failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
        if failed:  # the failure is the cause; its peers were likely waiting for it
            raise _rank_error(failed, f"{timed_out}\n") from None
        raise
    finally:
        finished = len(outcomes) == world_size  # else the stragglers are killed at once
        for proc in procs:
            proc.join(timeout=5 if finished else 0.1)
            if proc.is_alive():
                proc.kill()
    failures = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
    if failures:
        raise _rank_error(failures)
    return [torch.load(io.BytesIO(outcomes[rank][1]), weights_only=False) for rank in range(world_size)]


def _collect(results: Any, world_size: int, timeout: float, outcomes: dict[int, tuple[bool, Any]],
             procs: Sequence[Any] = ()) -> None:
    """Fill ``outcomes`` from the ``results`` queue until every rank reported; ``TimeoutError``
    naming the missing ranks once ``timeout`` seconds have passed since the call (one deadline for
    the whole run, not a wait per result). A rank whose process died without reporting (killed,
    ``os._exit``) counts as failed at once, so its peers' errors follow without waiting for the deadline."""
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size:
        try:
            rank, ok, value = results.get(timeout=min(max(deadline - time.monotonic(), 0.0), 0.5))
        except queue.Empty:
            for rank, proc in enumerate(procs):
                if rank not in outcomes and proc.exitcode not in (None, 0):
                    outcomes[rank] = (False, f"the process exited with code {proc.exitcode} before reporting "
                                             "(killed, or os._exit)\n")
            if time.monotonic() >= deadline:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout}s") from None
            continue
        outcomes[rank] = (ok, value)


def _rank_error(failed: dict[int, str], head: str = "") -> RankError:
    """One ``RankError`` holding every failing rank's traceback, after ``head``."""
    return RankError(head + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items())))
