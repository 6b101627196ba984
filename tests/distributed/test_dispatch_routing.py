"""Tokens go to the rank that owns their expert and come back to their source slot.

The exchange the layer runs (``exchange`` then ``by_expert`` to the experts, ``by_source`` then
``exchange_back`` back: the padded expert path) is checked with coded buffers (every row says which rank sent it,
for which expert, in which slot); the layer is checked with identity-like experts, so each output
row reveals the token (its source rank id and index) that produced it.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch.distributed import ProcessGroup

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import by_expert, by_source, exchange, exchange_back, expert_groups
from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

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


def dispatch(buffer_ECD: torch.Tensor, ep_size: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """The layer's way to its experts (padded compute): ``[E, C, D] -> [E_local, R*C, D]``."""
    return by_expert(exchange(buffer_ECD, ep_size, group))


def undispatch(out_LMD: torch.Tensor, ep_size: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """The layer's way back: ``[E_local, R*C, D] -> [E, C, D]`` on the source ranks."""
    return exchange_back(by_source(out_LMD, ep_size), group)


def _receiver_coded_gradients(ep_rank: int, ep_size: int, group: Optional[ProcessGroup]) -> dict:
    """``dispatch`` and ``undispatch`` each backpropagated alone, from an upstream gradient coded
    with the rank it lives on, so the gradient that reaches an input shows where it came from.

    ``dispatch``: the upstream gradient of received row ``[local, source * C + slot]`` on EP rank
    ``q`` is ``(q, local, source, slot)``. ``undispatch``: that of returned row ``[expert, slot]``
    on EP rank ``s`` is ``(s, expert, slot)``. (The round trip above cannot show a backward that
    skips its all-to-alls: the all-to-all is its own inverse, so two skipped ones cancel.)
    """
    num_experts = LOCAL_EXPERTS * ep_size
    sent_ECD = torch.zeros(num_experts, CAPACITY, 4, requires_grad=True)
    upstream = torch.empty(LOCAL_EXPERTS, ep_size, CAPACITY, 4)
    upstream[..., 0] = ep_rank
    upstream[..., 1] = torch.arange(LOCAL_EXPERTS).view(-1, 1, 1).float()
    upstream[..., 2] = torch.arange(ep_size).view(1, -1, 1).float()
    upstream[..., 3] = torch.arange(CAPACITY).float()
    dispatch(sent_ECD, ep_size, group).backward(upstream.view(LOCAL_EXPERTS, ep_size * CAPACITY, 4))
    expert_out = torch.zeros(LOCAL_EXPERTS, ep_size * CAPACITY, 3, requires_grad=True)
    undispatch(expert_out, ep_size, group).backward(_codes(ep_rank, num_experts))
    return {"dispatch_grad": sent_ECD.grad, "undispatch_grad": expert_out.grad}


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
            "grad": sent.grad, "x": x, "y": y.detach(), "router": layer.router.weight.detach(),
            **_receiver_coded_gradients(ep_rank, ep_size, groups.ep_group)}


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)],
                ids=lambda w: f"world{w}")
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
        # d(returned)/d(sent) is 10 * identity (whether or not the backward moves the gradient:
        # see the two tests below)
        assert torch.equal(res["grad"], (sent + 2.0) * 10.0), f"rank {rank}: gradient round trip"


def test_dispatch_backward_brings_each_gradient_from_the_expert_owner_to_the_sender(routed):
    world_size, results = routed
    num_experts = LOCAL_EXPERTS * world_size
    expert_E = torch.arange(num_experts).view(-1, 1).float()
    for rank, res in enumerate(results):
        # row [expert, slot] of this rank went to the expert's owner, as block ``rank``
        want = torch.empty(num_experts, CAPACITY, 4)
        want[..., 0] = expert_E // LOCAL_EXPERTS  # the receiving (owner) rank
        want[..., 1] = expert_E % LOCAL_EXPERTS
        want[..., 2] = rank
        want[..., 3] = torch.arange(CAPACITY).float()
        assert torch.equal(res["dispatch_grad"], want), (
            f"rank {rank}: dispatch gradient (receiver, local expert, source, slot) is "
            f"{res['dispatch_grad'][..., 0].tolist()} in the receiver channel; want the experts' owners")


def test_undispatch_backward_brings_each_gradient_from_the_source_to_the_expert_owner(routed):
    world_size, results = routed
    for rank, res in enumerate(results):
        # row [local, source * C + slot] here went back to ``source`` as row [expert, slot]
        want = torch.empty(LOCAL_EXPERTS, world_size, CAPACITY, 3)
        want[..., 0] = torch.arange(world_size).view(1, -1, 1).float()  # the receiving (source) rank
        want[..., 1] = rank * LOCAL_EXPERTS + torch.arange(LOCAL_EXPERTS).view(-1, 1, 1).float()
        want[..., 2] = torch.arange(CAPACITY).float()
        assert torch.equal(res["undispatch_grad"], want.view(LOCAL_EXPERTS, world_size * CAPACITY, 3)), (
            f"rank {rank}: undispatch gradient (receiver, expert, slot) is "
            f"{res['undispatch_grad'][..., 0].tolist()} in the receiver channel; want the source ranks")


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
