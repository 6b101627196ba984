"""Spawned gloo ranks for tests: see ``expert_parallel.spawn``."""

from expert_parallel.spawn import RankError, free_port, run_ranks

__all__ = ["RankError", "free_port", "run_ranks"]
