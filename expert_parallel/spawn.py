"""Run a function on N local gloo ranks (tests, benchmarks, examples), with a free port and a
timeout so a hang fails instead of blocking; optionally on a pool of ranks kept alive between runs
(``reuse=True``), as DeepSpeed's test harness does (``reuse_dist_env``), to skip the start-up of
each run (spawning, importing torch, joining the process group)."""

from __future__ import annotations

import atexit
import io
import os
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .comm import groups


class RankError(RuntimeError):
    """A spawned rank raised; the message holds every failing rank's traceback."""


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any,
            threads: int) -> None:
    os.environ.update(_rank_env(rank, world_size, port))
    torch.set_num_threads(threads)
    try:
        _init(world_size, rank)
        results.put((rank, True, _call(fn, rank, world_size, args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))


def _init(world_size: int, rank: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))


def _call(fn: Callable, rank: int, world_size: int, args: tuple) -> bytes:
    """``fn``'s result as ``torch.save`` bytes: shared-memory handles die with the child."""
    buffer = io.BytesIO()
    torch.save(fn(rank, world_size, *args), buffer)
    return buffer.getvalue()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
              threads_per_rank: int = 1, reuse: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    ``fn`` must be a module-level function; its return values (picklable) come back ordered by
    rank. Raises ``RankError`` with every failing rank's traceback, or ``TimeoutError``
    naming the ranks that did not finish within ``timeout`` seconds of the start, for the whole
    run (they are killed). A rank that dies without reporting fails the run at once.

    With ``reuse=True`` the ranks come from a pool kept alive in this process, one per
    (``world_size``, ``threads_per_rank``): the first call starts it, later calls skip the start-up.
    Between runs a pooled rank restores its environment variables, torch's global switches (threads,
    default dtype, grad mode, deterministic algorithms, anomaly detection) and drops every process
    group but the world (and ``expert_parallel``'s record of them), so each run starts as in a fresh
    process, apart from modules already imported and their module-level state. A pool is replaced
    by fresh ranks after any failure or timeout, and after a run that destroyed the world group or
    initialised DeepSpeed's communication (its global state outlives the run). ``fn`` must seed
    its own random generators.
    """
    if reuse:
        return _pooled(fn, world_size, args, timeout, threads_per_rank)
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
        _await(results, world_size, timeout, outcomes, procs)
    finally:
        finished = len(outcomes) == world_size  # else the stragglers are killed at once
        for proc in procs:
            proc.join(timeout=5 if finished else 0.1)
            if proc.is_alive():
                proc.kill()
    return _loaded(outcomes, world_size)


def _await(results: Any, world_size: int, timeout: float, outcomes: dict[int, tuple[bool, Any]],
           procs: Sequence[Any]) -> None:
    """``_collect``, then ``RankError`` with every failing rank's traceback, also when the run
    timed out after a failure (the failure is the cause; its peers were likely waiting for it)."""
    try:
        _collect(results, world_size, timeout, outcomes, procs)
    except TimeoutError as timed_out:
        failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
        if failed:
            raise _rank_error(failed, f"{timed_out}\n") from None
        raise
    failures = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
    if failures:
        raise _rank_error(failures)


def _loaded(outcomes: dict[int, tuple[bool, Any]], world_size: int) -> list[Any]:
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


class _Pool:
    """``world_size`` spawned gloo ranks that serve runs (``_serve``) until closed."""

    def __init__(self, world_size: int, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(rank, world_size, port, self.tasks[rank], self.results,
                                                        threads, os.getpid()))
                      for rank in range(world_size)]
        for proc in self.procs:
            proc.start()

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def close(self, wait: float) -> None:
        """Ask the ranks to leave, then kill those still there after ``wait`` seconds."""
        for tasks in self.tasks:
            tasks.put(None)
        deadline = time.monotonic() + wait
        for proc in self.procs:
            proc.join(timeout=max(deadline - time.monotonic(), 0.0))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1)


# (world size, threads per rank) -> the idle pool
_POOLS: dict[tuple[int, int], _Pool] = {}


def _pooled(fn: Callable, world_size: int, args: tuple, timeout: float, threads: int) -> list[Any]:
    """``run_ranks(..., reuse=True)``: run on the idle pool (a new one if none, or one of its ranks
    died); it goes back to ``_POOLS`` only after a run that every rank finished and can follow."""
    pool = _POOLS.pop((world_size, threads), None)
    if pool is not None and not pool.alive():
        pool.close(wait=0)
        pool = None
    pool = pool or _Pool(world_size, threads)
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        for tasks in pool.tasks:
            tasks.put((fn, args))
        _await(pool.results, world_size, timeout, outcomes, pool.procs)
    except BaseException:
        pool.close(wait=0)  # a failed rank's peers may be stuck in a collective
        raise
    reusable = all(value[1] for _, value in outcomes.values())
    outcomes = {rank: (ok, value[0]) for rank, (ok, value) in outcomes.items()}
    if reusable:
        _POOLS[(world_size, threads)] = pool
    else:
        pool.close(wait=5)
    return _loaded(outcomes, world_size)


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close(wait=5)


def _serve(rank: int, world_size: int, port: int, tasks: Any, results: Any, threads: int, parent: int) -> None:
    """A pooled rank: join the world once, then run ``(fn, args)`` tasks until told to leave
    (``None``), a run fails or leaves the process unfit for another, or the parent is gone. Reports
    ``(rank, True, (result bytes, reusable))`` or ``(rank, False, traceback)``."""
    os.environ.update(_rank_env(rank, world_size, port))
    torch.set_num_threads(threads)
    try:
        _init(world_size, rank)
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))
        return
    clean = _switches()
    while (task := _next_task(tasks, parent)) is not None:
        try:
            value = _call(task[0], rank, world_size, task[1])
        except BaseException:  # noqa: BLE001
            results.put((rank, False, traceback.format_exc()))
            break
        reusable = _restore(clean)
        results.put((rank, True, (value, reusable)))
        if not reusable:
            break
    if dist.is_initialized():
        dist.destroy_process_group()


def _next_task(tasks: Any, parent: int) -> Any:
    """The next task, or ``None`` when told to leave or the parent process is gone."""
    while True:
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _switches() -> dict[str, Any]:
    """The process-wide settings a run may change and ``_restore`` puts back."""
    return dict(environ=dict(os.environ), threads=torch.get_num_threads(), dtype=torch.get_default_dtype(),
                deterministic=torch.are_deterministic_algorithms_enabled(), anomaly=torch.is_anomaly_enabled())


def _restore(clean: dict[str, Any]) -> bool:
    """Undo a run's changes to ``clean`` (``_switches``), destroy the process groups it made and
    forget them; ``False`` when this process cannot serve another run (the world group is gone, or
    DeepSpeed's communication was initialised: its globals outlive the run)."""
    os.environ.clear()
    os.environ.update(clean["environ"])
    torch.set_num_threads(clean["threads"])
    torch.set_default_dtype(clean["dtype"])
    torch.use_deterministic_algorithms(clean["deterministic"])
    torch.autograd.set_detect_anomaly(clean["anomaly"])
    torch.set_grad_enabled(True)
    deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
    if not dist.is_initialized() or getattr(deepspeed_comm, "cdb", None) is not None:
        return False
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)
    groups.forget()
    return True
