"""A rank that runs out of data first: ``Join([UnevenInputs(model)])`` shadows the MoE layers'
collectives for it. Rank 0 has 5 batches, rank 1 has 3 (EP 2, two MoE layers, dropless); both
finish, and rank 0's outputs and every rank's expert gradients equal the single-process model
with the full weights run on all 8 batches."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.testing import assert_close

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import UnevenInputs
from tests.harness import run_ranks

D, BATCHES = 8, (5, 3)


class TwoMoE(nn.Module):
    def __init__(self, ep_size: int) -> None:
        super().__init__()
        cfg = MoEConfig(d_model=D, d_ff=12, num_experts=4, ep_size=ep_size, router="topk", top_k=2, dropless=True,
                        num_chunks=2)
        # a dense layer first: the MoE inputs require grad, as behind any trained layer
        self.embed, self.first, self.second = nn.Linear(D, D), MoELayer(cfg), MoELayer(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.first(x).output
        return x + self.second(x).output


def _full_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TwoMoE(1).state_dict()


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(3 + step, D, generator=torch.Generator().manual_seed(100 * rank + step))


def _load(model: TwoMoE, rank: int, local: int) -> None:
    state = {k: (v[rank * local:(rank + 1) * local] if ".experts." in k else v) for k, v in _full_state().items()}
    model.load_state_dict(state)


def uneven_run(rank: int, world_size: int) -> dict:
    model = TwoMoE(world_size)
    _load(model, rank, 2)
    outputs = []
    with Join([UnevenInputs(model)]):
        for step in range(BATCHES[rank]):
            y = model(_batch(rank, step))
            y.sum().backward()
            outputs.append(y.detach())
    return {"outputs": outputs, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def test_a_rank_with_fewer_batches_joins_and_its_peer_computes_as_one_process():
    results = run_ranks(uneven_run, 2, timeout=120)
    reference = TwoMoE(1)
    reference.load_state_dict(_full_state())
    for rank, batches in enumerate(BATCHES):
        for step in range(batches):
            y = reference(_batch(rank, step))
            y.sum().backward()
            if rank == 0:
                assert_close(results[0]["outputs"][step], y.detach(), rtol=1e-4, atol=1e-5)
    for rank, result in enumerate(results):
        for name, param in reference.named_parameters():
            if ".experts." in name:
                assert_close(result["grads"][name], param.grad[rank * 2:(rank + 1) * 2], rtol=1e-4, atol=1e-5,
                             msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
