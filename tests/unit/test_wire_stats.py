"""RoutingStats.wire_bytes and padding_fraction against hand-computed closed forms."""

from __future__ import annotations

import pytest
import torch

from expert_parallel.layout import assign_slots
from expert_parallel.routing import Routing
from expert_parallel.stats import routing_stats
from tests.unit.layer_helpers import NUM_EXPERTS, make_input, make_layer


def _skewed_stats(ep_size: int, ep_rank: int, row_bytes: int = 16):
    # top-1 over E=4 experts, capacity 3: expert 0 gets 5 tokens (fills 3, drops 2), experts 1
    # and 2 one each, expert 3 none
    expert_SK = torch.tensor([[0], [0], [0], [0], [0], [1], [2]])
    active_SK = torch.ones_like(expert_SK, dtype=torch.bool)
    routing = Routing(expert_SK, torch.ones(7, 1), active_SK, torch.full((7, 4), 0.25), {})
    plan = assign_slots(expert_SK, active_SK, 4).plan(3)
    return routing_stats(routing, plan, torch.zeros((), dtype=torch.long), ep_size, ep_rank, row_bytes)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_padding_matches_its_own_token_counts(dtype):
    layer = make_layer(capacity=6).to(dtype)
    stats = layer(make_input(20).to(dtype)).stats
    fill = stats.tokens_per_expert.clamp(max=6).sum().item()
    assert stats.wire_bytes.item() == 0
    assert stats.padding_fraction.item() == pytest.approx(1 - fill / (NUM_EXPERTS * 6))
    assert 0 < stats.padding_fraction.item() < 1 and not stats.padding_fraction.requires_grad
