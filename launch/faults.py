"""Failures in ``launch.train``: ``--simulate-failure RANK:STEP[:hang]`` (a rank that crashes, or
stalls in its forward), and the table a rank prints when a collective times out, naming the ranks
that never arrived (from every rank's ``expert_parallel.flight`` record)."""

from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple, Optional

import torch.distributed as dist
from torch import nn

from expert_parallel import MoELayer
from expert_parallel.flight import FlightRecord, default_store, read_flight_records, stragglers

FAILURE_PATTERN = r"\d+:\d+(:hang)?"


class Failure(NamedTuple):
    """``--simulate-failure``: rank ``rank`` crashes (``os._exit``) or, with ``hang``, stalls in its
    forward, at step ``step``."""

    rank: int
    step: int
    hang: bool

    @classmethod
    def parse(cls, text: Optional[str]) -> Optional[Failure]:
        """``"RANK:STEP[:hang]"`` (checked by ``launch.flags``), or ``None``."""
        if not text:
            return None
        rank, step, *mode = text.split(":")
        return cls(int(rank), int(step), mode == ["hang"])

    def strike(self, model: nn.Module) -> None:
        """Crash now, abruptly like a dead node (no cleanup, no goodbye to the peers), or make the
        model's first MoE layer stall in its next forward (the whole model's without one)."""
        if not self.hang:
            os._exit(3)
        target = next((m for m in model.modules() if isinstance(m, MoELayer)), model)
        target.register_forward_pre_hook(_stall)


def _stall(module: nn.Module, args: tuple) -> None:
    while True:  # until the job is stopped; sleeping releases the GIL, so the flight record is published
        time.sleep(1)


# how a collective whose peer stalled or died fails (gloo raises plain RuntimeErrors)
PEER_FAILURES = ("timed out", "connection closed", "connection reset")


def is_peer_failure(error: BaseException) -> bool:
    """Did a collective fail because a peer never came (timed out, or its connection dropped)?"""
    return isinstance(error, dist.DistError) or any(text in str(error).lower() for text in PEER_FAILURES)


def report_stall(error: BaseException) -> None:
    """After ``error`` (a collective failed or timed out), print where every rank stopped, naming
    the ranks behind the others, to stderr; once per job (the first rank to get here)."""
    try:
        store = default_store()
        if store.add("flight/reports", 1) != 1:
            return
        records = read_flight_records(store, dist.get_world_size())
    except Exception as unreadable:  # noqa: BLE001 - the store may have gone with a dead rank
        print(f"launch.train: rank {dist.get_rank()}: {type(error).__name__}; no flight record ({unreadable})",
              file=sys.stderr, flush=True)
        return
    print(flight_table(records, dist.get_rank(), error), file=sys.stderr, flush=True)


def flight_table(records: list[Optional[FlightRecord]], reporter: int, error: BaseException) -> str:
    """The report: a headline naming the stragglers, then one row per rank."""
    behind = stragglers(records)
    now = time.time()
    if behind:
        headline = (f"launch.train: rank(s) {', '.join(map(str, behind))} never arrived (rank {reporter} gave up "
                    f"waiting: {type(error).__name__}); where every rank stopped:")
    else:
        headline = (f"launch.train: rank {reporter} stopped ({type(error).__name__}); every rank reached the same "
                    "point (a collective the ranks disagree on, or a failure inside it); where every rank stopped:")
    rows = [("rank", "host", "step", "MoE layer", "last event", "tokens", "capacity", "idle", "")]
    for rank, record in enumerate(records):
        if record is None:
            rows.append((str(rank), "?", "-", "-", "no record", "-", "-", "-", "<- never arrived"))
            continue
        rows.append((str(rank), record.host, str(record.step), _dash(record.layer), record.phase,
                     _dash(record.tokens), _dash(record.capacity), f"{now - record.time:.1f}s",
                     "<- never arrived" if rank in behind else "waiting"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([headline, *lines])


def _dash(value: Optional[int]) -> str:
    return "-" if value is None else str(value)
