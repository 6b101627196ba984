"""DeepSeek-V3's selection-bias update on 2 gloo ranks: the loads are summed over the ranks (one
all-reduce for the whole model), so every rank takes the same step, which neither rank's own load
would give; an EP=2 layer and a data-parallel (EP=1) layer in one model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import update_selection_biases
from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

RATES = (0.5, 0.25)
# hand-set counts per rank and layer; summed: layer 0 [6, 2, 3, 5] (mean 4), layer 1 [3, 2, 2, 0] (mean 7/4)
COUNTS = {0: ([6, 0, 1, 1], [3, 1, 0, 0]), 1: ([0, 2, 2, 4], [0, 1, 2, 0])}
WANT = ([-0.5, 0.5, 0.5, -0.5], [-0.25, -0.25, -0.25, 0.25])


def _model() -> nn.Sequential:
    torch.manual_seed(0)  # the same router on every rank
    fields = dict(d_model=8, d_ff=12, num_experts=4, router="topk", top_k=2, scoring_func="sigmoid",
                  capacity_factor=2.0)
    return nn.Sequential(MoELayer(MoEConfig(**fields, ep_size=2, bias_update_rate=RATES[0])),
                         MoELayer(MoEConfig(**fields, ep_size=1, bias_update_rate=RATES[1])))


def run_updates(rank: int, world_size: int) -> dict:
    """Spawned worker: a hand-set update, counting the all-reduces; then a forward on this rank's
    own tokens per layer and an update."""
    calls = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return all_reduce(*args, **kwargs)

    model = _model()
    for layer, counts in zip(model, COUNTS[rank]):
        layer.router.count_selection(torch.tensor(counts))
    dist.all_reduce = counted
    try:
        update_selection_biases(model)
    finally:
        dist.all_reduce = all_reduce
    hand = [layer.router.selection_bias.tolist() for layer in model]

    model = _model()
    x = torch.randn(10 + 6 * rank, 8, generator=torch.Generator().manual_seed(rank + 1))
    loads = [layer(x).stats.tokens_per_expert for layer in model]
    update_selection_biases(model)
    return dict(calls=calls, hand=hand, loads=loads, biases=[layer.router.selection_bias.clone() for layer in model],
                zeroed=all(int(layer.router.selection_load.abs().sum()) == 0 for layer in model))


def test_selection_bias_update_sums_the_loads_over_ranks_with_one_all_reduce():
    results = run_ranks(run_updates, 2, timeout=120)
    for result in results:
        assert result["calls"] == [torch.Size([8])]  # both layers' 4 counts, one all-reduce
        assert result["hand"] == list(WANT)
        assert result["zeroed"]
    for i, rate in enumerate(RATES):
        load = results[0]["loads"][i] + results[1]["loads"][i]
        assert not torch.equal(results[0]["loads"][i], results[1]["loads"][i])
        want = rate * torch.sign(load.float().mean() - load.float())
        for result in results:
            assert torch.equal(result["biases"][i], want)
