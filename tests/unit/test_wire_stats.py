"""RoutingStats.wire_bytes and padding_fraction against hand-computed closed forms: which slots
are filled is set by hand (the routing, or the router's weights), never read from the stats."""

from __future__ import annotations

import pytest
import torch

from expert_parallel.layout import assign_slots
from expert_parallel.routing import Routing
from expert_parallel.stats import routing_stats
from tests.unit.layer_helpers import D_MODEL, make_layer


def _skewed_stats(ep_size: int, ep_rank: int, row_bytes: int = 16, capacity: int = 3, tp_size: int = 1,
                  tp_rank: int = 0):
    # top-1 over E=4 experts: expert 0 gets 5 tokens (fills min(5, capacity)), experts 1 and 2
    # one each, expert 3 none
    expert_SK = torch.tensor([[0], [0], [0], [0], [0], [1], [2]])
    active_SK = torch.ones_like(expert_SK, dtype=torch.bool)
    routing = Routing(expert_SK, torch.ones(7, 1), active_SK, torch.full((7, 4), 0.25), {})
    plan = assign_slots(expert_SK, active_SK, 4).plan(capacity)
    return routing_stats(routing, plan, torch.zeros((), dtype=torch.long), ep_size, ep_rank, row_bytes,
                         tp_size, tp_rank)


@pytest.mark.parametrize(("ep_size", "ep_rank", "sent_slots", "filled"), [
    (2, 0, 6, 1),  # rank 0 keeps experts 0-1, sends experts 2-3: 6 slots, 1 filled (expert 2)
    (2, 1, 6, 4),  # rank 1 keeps experts 2-3, sends experts 0-1: 3 + 1 filled
    (4, 3, 9, 5),  # rank 3 keeps expert 3 (empty), sends the 3 other experts: 3 + 1 + 1
    (4, 0, 9, 2),  # rank 0 keeps expert 0 (full), sends 1-3: 1 + 1 + 0
])
def test_skewed_dispatch_sends_the_other_ranks_blocks_and_their_padding(ep_size, ep_rank, sent_slots, filled):
    stats = _skewed_stats(ep_size, ep_rank)
    assert stats.wire_bytes.item() == sent_slots * 16 and stats.wire_bytes.dtype == torch.long
    assert stats.padding_fraction.item() == pytest.approx(1 - filled / sent_slots)


def test_one_rank_sends_nothing_and_reports_the_whole_buffers_padding():
    stats = _skewed_stats(1, 0)
    assert stats.wire_bytes.item() == 0
    assert stats.padding_fraction.item() == pytest.approx(1 - 5 / 12)  # 3 + 1 + 1 of 4 * 3 slots


@pytest.mark.parametrize(("ep_rank", "tp_rank", "filled"), [
    # capacity 4, TP 2: TP rank 0 sends slots 0-1 of each expert, TP rank 1 slots 2-3; the fills
    # are expert 0: 4, 1: 1, 2: 1, 3: 0, so the shares hold [2, 1, 1, 0] and [2, 0, 0, 0]
    (0, 0, 1),  # EP rank 0 sends experts 2-3: 1 + 0 filled of its 2 + 2 slots
    (0, 1, 0),
    (1, 0, 3),  # EP rank 1 sends experts 0-1: 2 + 1
    (1, 1, 2),
])
def test_a_tp_rank_sends_its_share_of_the_slots(ep_rank, tp_rank, filled):
    stats = _skewed_stats(2, ep_rank, capacity=4, tp_size=2, tp_rank=tp_rank)
    # (E - E_local) * C / tp * row bytes = 2 * 4 / 2 * 16, not the whole capacity's 2 * 4 * 16
    assert stats.wire_bytes.item() == 2 * 2 * 16
    assert stats.padding_fraction.item() == pytest.approx(1 - filled / 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_padding_counts_the_slots_its_router_fills(dtype):
    # a Switch router that sends a one-hot token on input dimension e to expert e: 9 tokens to
    # expert 0, 2 to expert 1, none to 2, 1 to 3; capacity 6 fills 6 + 2 + 0 + 1 of 4 * 6 slots
    layer = make_layer(router="switch", capacity=6).to(dtype)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :4].copy_(10 * torch.eye(4))
    x_SD = torch.eye(D_MODEL)[[0] * 9 + [1] * 2 + [3]].to(dtype)
    stats = layer(x_SD).stats
    assert stats.wire_bytes.item() == 0
    assert stats.padding_fraction.item() == pytest.approx(1 - 9 / 24)
    assert not stats.padding_fraction.requires_grad
