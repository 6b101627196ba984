"""Spawned gloo ranks for tests: see ``expert_parallel.spawn``. Tests reuse the ranks between runs
(``reuse=True`` by default here): a pool per world size stays alive for the whole pytest process
and is replaced after a failure, a timeout, or a run that initialised DeepSpeed."""

from typing import Any, Callable

from expert_parallel.spawn import RankError, free_port
from expert_parallel.spawn import run_ranks as _run_ranks

__all__ = ["RankError", "free_port", "run_ranks"]


def run_ranks(fn: Callable, world_size: int, *args: Any, reuse: bool = True, **kwargs: Any) -> list[Any]:
    """``expert_parallel.spawn.run_ranks`` with ``reuse=True`` unless told otherwise (a test that
    needs pristine processes passes ``reuse=False``)."""
    return _run_ranks(fn, world_size, *args, reuse=reuse, **kwargs)
