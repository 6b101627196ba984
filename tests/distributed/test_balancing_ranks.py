"""The global-batch balance loss at data-parallel size 2 (the shares ``f_e`` from both ranks'
counts, the probabilities local; value and router gradient against a plain computation of both
ranks' routing), and routing replay at EP size 2, in one spawn."""

from __future__ import annotations

import torch

from expert_parallel import MoEConfig, MoELayer, routing
from tests.harness import run_ranks

FIELDS = dict(d_model=8, d_ff=12, num_experts=4, router="topk", top_k=2, capacity=32, aux_loss_weight=1.0)


def _tokens(rank: int) -> torch.Tensor:
    return torch.randn(6 + 4 * rank, 8, generator=torch.Generator().manual_seed(rank + 1))


def run_checks(rank: int, world_size: int) -> dict:
    """Spawned worker: the global loss on this rank's tokens, its reference, and an EP=2 replay."""
    torch.manual_seed(0)  # the same router on every rank
    layer = MoELayer(MoEConfig(**FIELDS, aux_loss_scope="global"))
    aux = layer(_tokens(rank)).aux_loss
    aux.backward()
    weight = layer.router.weight.detach().clone().requires_grad_(True)
    counts = torch.zeros(4)
    for other in range(world_size):  # every rank's choices, recomputed here
        chosen = torch.softmax(_tokens(other) @ weight.detach().t(), dim=-1).topk(2, dim=-1).indices
        counts += torch.bincount(chosen.reshape(-1), minlength=4)
    probs_SE = torch.softmax(_tokens(rank) @ weight.t(), dim=-1)
    want = 4 * (counts / counts.sum() * probs_SE.mean(dim=0)).sum()
    want.backward()
    batch = MoELayer(MoEConfig(**FIELDS)).requires_grad_(False)
    batch.router.weight.copy_(layer.router.weight)

    torch.manual_seed(0)
    ep_layer = MoELayer(MoEConfig(**FIELDS, ep_size=2))
    x = _tokens(rank)
    with routing.record(ep_layer) as rec:
        y = ep_layer(x).output
    with routing.replay(ep_layer, rec):
        same = torch.equal(ep_layer(x).output, y)
    with torch.no_grad():
        ep_layer.router.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(5)))
    with routing.replay(ep_layer, rec):
        replayed_counts = ep_layer(x).stats.tokens_per_expert
    recorded = torch.bincount(rec.experts()[0].long().reshape(-1), minlength=4)
    return dict(aux=aux.detach(), want=want.detach(), grad=layer.router.weight.grad, want_grad=weight.grad,
                batch_aux=batch(_tokens(rank)).aux_loss, same=same, replayed=replayed_counts, recorded=recorded)


def test_global_scope_shares_come_from_every_rank_and_replay_works_at_ep_2():
    for result in run_ranks(run_checks, 2, timeout=120):
        torch.testing.assert_close(result["aux"], result["want"])
        torch.testing.assert_close(result["grad"], result["want_grad"])
        assert not torch.allclose(result["batch_aux"], result["want"])  # the rank's own shares differ
        assert result["same"]
        assert torch.equal(result["replayed"], result["recorded"])
