"""The one timing helper of the suite: phase marks, the alternating loop, medians and spreads.

On CUDA a ``Clock`` records events on the current stream (no host sync until ``read``); on the
CPU it is a synchronized wall clock: a barrier over the process group (when there is one) and
``time.perf_counter`` at every mark, so a phase's time is the slowest rank's.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

Step = Callable[[], dict[str, float]]


class Clock:
    """Time consecutive phases: ``start()``, then ``mark(name)`` at the end of each phase.

    Args:
        device: where the work runs; ``cuda`` uses events, anything else the wall clock.
        sync_ranks: on the CPU, barrier before every reading so all ranks agree on phase edges.
    """

    def __init__(self, device: torch.device, sync_ranks: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.sync_ranks = sync_ranks and dist.is_initialized() and dist.get_world_size() > 1
        self._marks: list[tuple[str, object]] = []

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.sync_ranks:
            dist.barrier()
        return time.perf_counter()

    def start(self) -> None:
        """Forget earlier marks and take the starting point."""
        self._marks = [("", self._now())]

    def mark(self, name: str) -> None:
        """End the phase ``name`` here (a name marked twice adds up)."""
        self._marks.append((name, self._now()))

    def read(self) -> dict[str, float]:
        """Milliseconds per phase name (synchronizes the device once on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, before), (name, after) in zip(self._marks, self._marks[1:]):
            ms = before.elapsed_time(after) if self.cuda else (after - before) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


def timed(fn: Callable[[], object], device: torch.device, name: str = "total") -> Step:
    """A step that runs ``fn`` once and returns ``{name: ms}``."""
    def step() -> dict[str, float]:
        clock = Clock(device)
        clock.start()
        fn()
        clock.mark(name)
        return clock.read()
    return step


def alternate(steps: dict[str, Step], warmup: int, repeat: int,
              before_each: Optional[Callable[[], None]] = None,
              progress: Optional[Iterable[int]] = None) -> dict[str, dict[str, list[float]]]:
    """Run the steps in turn, ``warmup + repeat`` rounds, so every one sees the same machine state.

    Returns ``{step: {phase: [ms per timed round]}}``. ``before_each`` runs untimed before every
    step (e.g. dropping gradients); ``progress`` wraps the round counter (a tqdm bar).
    """
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in steps}
    rounds = progress if progress is not None else range(warmup + repeat)
    for index in rounds:
        for name, step in steps.items():
            if before_each is not None:
                before_each()
            phases = step()
            if index >= warmup:
                for phase, ms in phases.items():
                    samples[name].setdefault(phase, []).append(ms)
    return samples


def summarize(values: list[float]) -> dict[str, float]:
    """Median and spread of timings in ms: ``median, p25, p75, min, max, n``."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": quartiles[0], "p75": quartiles[2],
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def slowest_rank(per_rank: list[list[float]]) -> list[float]:
    """Per round, the slowest rank's time: ``[ranks][rounds] -> [rounds]``."""
    return [max(column) for column in zip(*per_rank)]
