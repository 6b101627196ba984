"""The flight recorder on one process: the record follows the MoE layers' own events, is
published to a store, and the ranks behind the others are named."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.flight import FlightRecord, FlightRecorder, read_flight_records, stragglers


def test_the_record_follows_the_layers_and_reaches_the_store() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4, capacity_factor=1.0,
                                                                   min_capacity=0)))
    store = dist.HashStore()
    events = []
    model[1].register_phase_hook(events.append)
    with FlightRecorder(model, store, interval_s=0.01) as recorder:
        recorder.step(5)
        assert recorder.record[2:6] == (5, None, "step", 0)
        model(torch.randn(3, 4, 8))
        record = recorder.record
    # enter, every forward phase event the layer fired, exit
    assert (record.step, record.layer, record.phase, record.events) == (5, 0, "fwd/exit", len(events) + 2)
    assert (record.tokens, record.capacity) == (12, 6)  # ceil(2 * 12 * 1.0 / 4) with GShard top-2
    assert read_flight_records(store, 2) == [record, None]  # rank 1 never published
    model(torch.randn(2, 8))
    assert read_flight_records(store, 1) == [record]  # closed: the hooks are gone


def test_stragglers_are_the_ranks_behind_the_furthest_one() -> None:
    def at(rank: int, step: int, events: int) -> FlightRecord:
        return FlightRecord(rank, "host", step, 0, "fwd/route", events)

    assert stragglers([at(0, 3, 2), at(1, 3, 1), at(2, 3, 2)]) == [1]
    assert stragglers([at(0, 4, 0), at(1, 3, 9), None]) == [1, 2]
    assert stragglers([at(0, 3, 2), at(1, 3, 2)]) == []
