"""A flight recorder that knows MoE: where each rank is, published where a stalled peer's
cooperation is not needed.

Every rank keeps one small record (step, MoE layer, the last phase event, token count, capacity)
updated by the MoE layers' own hooks (``MoELayer.register_phase_hook`` and forward hooks: a few
attribute writes, no host sync). A daemon thread copies it to the process group's key-value store
(``store.set``, not a collective) whenever it changed, at most every ``interval_s``, so a rank
stuck in its forward or in a collective (the GIL released) still shows where it stopped. When a
collective times out, any rank reads every rank's record (``read_flight_records``) and
``stragglers`` names the ranks behind the others: the ones that never arrived.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from functools import partial
from typing import Any, NamedTuple, Optional

import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layer import MoELayer


class FlightRecord(NamedTuple):
    """Where one rank is.

    Attributes:
        rank: global rank.
        host: its host name.
        step: the training step (``FlightRecorder.step``), -1 before the first.
        layer: index of the MoE layer (in ``model.modules()`` order) of the last event, ``None``
            outside MoE layers.
        phase: the last event: ``"step"`` (a step began), ``"fwd/enter"`` (a layer's forward
            began), a layer's phase event (``"fwd/route"``, ``"bwd/dispatch"``...), ``"fwd/exit"``,
            or what ``FlightRecorder.mark`` recorded.
        events: events since the step began (ranks running the same program agree on it, so a
            smaller count in the same step is a rank behind).
        tokens: tokens of the layer's last forward on this rank.
        capacity: the layer's slots per expert: the config's fixed capacity, else that of the
            layer's last finished forward when known without a host sync (stats on the CPU).
        time: wall-clock time (``time.time()``) of the last event.
    """

    rank: int
    host: str
    step: int = -1
    layer: Optional[int] = None
    phase: str = "start"
    events: int = 0
    tokens: Optional[int] = None
    capacity: Optional[int] = None
    time: float = 0.0


class FlightRecorder:
    """Keep this rank's ``FlightRecord`` from ``model``'s MoE layers and publish it to ``store``.

    Args:
        model: the module holding the ``MoELayer`` s (any depth; DeepSpeed's drop-in and the
            Hugging Face blocks hold one).
        store: where to publish (``default_store()``); ``None`` keeps the record local.
        interval_s: how often the publisher looks for a change.
        prefix: the store keys are ``f"{prefix}/{rank}"``.

    Use it as a context manager, or call ``close`` (before the process group is destroyed).
    """

    def __init__(self, model: nn.Module, store: Optional[dist.Store] = None, interval_s: float = 0.1,
                 prefix: str = "flight") -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.record = FlightRecord(rank, socket.gethostname(), time=time.time())
        self.store, self.key = store, f"{prefix}/{rank}"
        self._handles: list[RemovableHandle] = []
        self._capacities: dict[int, int] = {}  # MoE layer -> capacity of its last finished forward
        for index, layer in enumerate(m for m in model.modules() if isinstance(m, MoELayer)):
            self._handles += [layer.register_phase_hook(partial(self._event, index)),
                              layer.register_forward_pre_hook(partial(self._enter, index)),
                              layer.register_forward_hook(partial(self._exit, index))]
        self._stop = threading.Event()
        self._thread = None
        if store is not None:
            self._thread = threading.Thread(target=self._publish, args=(interval_s,), daemon=True,
                                            name="flight-recorder")
            self._thread.start()

    def step(self, step: int) -> None:
        """A training step begins."""
        self.record = self.record._replace(step=step, layer=None, phase="step", events=0, time=time.time())

    def mark(self, phase: str) -> None:
        """Record an event outside the MoE layers (e.g. ``"optimizer"``)."""
        self.record = self.record._replace(layer=None, phase=phase, events=self.record.events + 1, time=time.time())

    def close(self) -> None:
        """Remove the hooks, publish the last record and stop publishing."""
        for handle in self._handles:
            handle.remove()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FlightRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _event(self, layer: int, phase: str) -> None:
        self.record = self.record._replace(layer=layer, phase=phase, events=self.record.events + 1, time=time.time())

    def _enter(self, layer: int, module: MoELayer, args: tuple) -> None:
        x = args[0]
        self.record = self.record._replace(layer=layer, phase="fwd/enter", events=self.record.events + 1,
                                           tokens=x.numel() // max(x.shape[-1], 1),
                                           capacity=module.cfg.capacity or self._capacities.get(layer),
                                           time=time.time())

    def _exit(self, layer: int, module: MoELayer, args: tuple, output: Any) -> None:
        stats = getattr(output, "stats", None)
        if stats is not None and stats.capacity.device.type == "cpu":
            self._capacities[layer] = int(stats.capacity)
        capacity = module.cfg.capacity or self._capacities.get(layer)
        self.record = self.record._replace(layer=layer, phase="fwd/exit", events=self.record.events + 1,
                                           capacity=capacity, time=time.time())

    def _publish(self, interval_s: float) -> None:
        published = None
        while True:
            stopping, record = self._stop.is_set(), self.record  # a last look after close
            if record is not published:
                try:
                    self.store.set(self.key, json.dumps(record._asdict()))
                except Exception:  # noqa: BLE001 - the store went away with the job: stop quietly
                    return
                published = record
            if stopping:
                return
            self._stop.wait(interval_s)


def default_store() -> Optional[dist.Store]:
    """The default process group's key-value store (the rendezvous' TCPStore under ``env://``
    and ``torchrun``); ``None`` without a process group."""
    if not dist.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


def read_flight_records(store: dist.Store, world_size: int, prefix: str = "flight") -> list[Optional[FlightRecord]]:
    """Every rank's last published record, by rank (``None`` for a rank that published none).
    Reads only keys that exist, so it never waits for a stalled rank."""
    records: list[Optional[FlightRecord]] = []
    for rank in range(world_size):
        key = f"{prefix}/{rank}"
        records.append(FlightRecord(**json.loads(store.get(key))) if store.check([key]) else None)
    return records


def stragglers(records: list[Optional[FlightRecord]]) -> list[int]:
    """The ranks behind the furthest one (an earlier step, or fewer events in the same step), and
    those without a record: the ranks the others wait for. Empty when every rank stopped at the
    same place."""
    positions = {r.rank: (r.step, r.events) for r in records if r is not None}
    furthest = max(positions.values(), default=None)
    return [rank for rank, record in enumerate(records)
            if record is None or positions[record.rank] < furthest]
