"""Tokens go to the rank that owns their expert and come back to their source slot.

``dispatch``/``undispatch`` are checked with coded buffers (every row says which rank sent it,
for which expert, in which slot); the layer is checked with identity-like experts, so each output
row reveals the token (its source rank id and index) that produced it.
"""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import dispatch, expert_groups, undispatch
from tests.harness import run_ranks

LOCAL_EXPERTS = 2
CAPACITY = 3
TOKENS = 8
D_MODEL = 4


def _codes(ep_rank: int, num_experts: int) -> torch.Tensor:
    """``[E, C, 3]``: (source EP rank, global expert, slot) in every row."""
    buffer_ECD = torch.empty(num_experts, CAPACITY, 3)
    buffer_ECD[..., 0] = ep_rank
    buffer_ECD[..., 1] = torch.arange(num_experts).view(-1, 1).float()
    buffer_ECD[..., 2] = torch.arange(CAPACITY).float()
    return buffer_ECD


def _identity_layer(ep_size: int) -> MoELayer:
    """Switch layer whose expert ``e`` computes ``(e + 1) * x`` exactly (``relu(x) - relu(-x)``)."""
    cfg = MoEConfig(d_model=D_MODEL, d_ff=2 * D_MODEL, num_experts=LOCAL_EXPERTS * ep_size,
                    router="switch", top_k=1, activation="relu", capacity=TOKENS, ep_size=ep_size)
    layer = MoELayer(cfg)
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        router = torch.randn(cfg.num_experts, D_MODEL, generator=torch.Generator().manual_seed(7))
        router[:, :2] = 0.0  # route on the random channels; channels 0 and 1 carry the ids
        layer.router.weight.copy_(router)
        for local in range(LOCAL_EXPERTS):
            scale = layer.ep_ranks.index(torch.distributed.get_rank()) * LOCAL_EXPERTS + local + 1
            layer.experts.w1[local] = torch.cat([eye, -eye], dim=1)
            layer.experts.w2[local] = torch.cat([eye, -eye], dim=0) * scale
    return layer


def route_coded_tokens(rank: int, world_size: int, ep_size: int) -> dict:
    """Spawned worker: coded buffers through dispatch/undispatch, then identity experts."""
    torch.manual_seed(rank)
    groups = expert_groups(ep_size)
    ep_rank = groups.ep_ranks.index(rank)
    num_experts = LOCAL_EXPERTS * ep_size
    sent = _codes(ep_rank, num_experts).requires_grad_()
    received = dispatch(sent, ep_size, groups.ep_group)
    # the "expert" tags each row with its owner, so the return trip is visible too
    returned = undispatch(received * 10.0 + 1000.0 * ep_rank, ep_size, groups.ep_group)
    returned.backward(torch.full_like(returned, 2.0) + sent.detach())
    layer = _identity_layer(ep_size)
    x = torch.randn(TOKENS, D_MODEL)
    x[:, 0] = rank + 1.0  # the source rank id, visible in the output
    x[:, 1] = torch.arange(TOKENS) + 100.0 * (rank + 1)  # and the token's own index
    y = layer(x).output
    return {"ep_rank": ep_rank, "received": received.detach(), "returned": returned.detach(),
            "grad": sent.grad, "x": x, "y": y.detach(), "router": layer.router.weight.detach()}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def routed(request):
    """One spawn per world size (EP = world) feeds both tests."""
    return request.param, run_ranks(route_coded_tokens, request.param, request.param, timeout=90)


def test_tokens_reach_their_expert_rank_and_return_to_their_slot(routed):
    world_size, results = routed
    num_experts = LOCAL_EXPERTS * world_size
    for rank, res in enumerate(results):
        owner = res["ep_rank"]
        assert owner == rank
        received = res["received"]
        assert received.shape == (LOCAL_EXPERTS, world_size * CAPACITY, 3)
        for local in range(LOCAL_EXPERTS):
            for source in range(world_size):
                block = received[local, source * CAPACITY:(source + 1) * CAPACITY]
                expected = _codes(source, num_experts)[owner * LOCAL_EXPERTS + local]
                assert torch.equal(block, expected), (
                    f"rank {rank}, local expert {local}: block {source} is {block.tolist()}, "
                    f"expected rows from rank {source} for expert {owner * LOCAL_EXPERTS + local}")
        sent = _codes(owner, num_experts)
        owner_E = (torch.arange(num_experts) // LOCAL_EXPERTS).float().view(-1, 1, 1)
        assert torch.equal(res["returned"], sent * 10.0 + 1000.0 * owner_E), f"rank {rank}: return trip"
        # the backward runs both all-to-alls in reverse: d(returned)/d(sent) is 10 * identity
        assert torch.equal(res["grad"], (sent + 2.0) * 10.0), f"rank {rank}: gradient round trip"


def test_layer_returns_each_token_from_its_expert_to_its_source(routed):
    world_size, results = routed
    owners = set()
    for rank, res in enumerate(results):
        x = res["x"].double()
        probs = torch.softmax(x @ res["router"].double().t(), dim=-1)
        weight, expert = probs.max(dim=-1)
        owners.update((expert // LOCAL_EXPERTS).tolist())
        expected = weight.unsqueeze(-1) * (expert + 1).unsqueeze(-1) * x
        torch.testing.assert_close(res["y"].double(), expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, r=rank: f"rank {r}: {m}")
    assert len(owners) > 1, "every token went to one rank; the test would not see misrouting"
