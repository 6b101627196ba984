"""Spawned gloo ranks for tests: see ``expert_parallel.spawn``."""

from expert_parallel.spawn import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
